"""Model packages: a self-describing, tamper-evident folder that predicts with calibrated thresholds.

Layout: ``manifest.json`` (format, versions, family, parameters, preprocessing, thresholds, metrics, costs,
training-data fingerprint, sha256 of every other file), ``detector.json`` (the detector's fitted state),
``weights.safetensors`` (its arrays), ``backbone.safetensors`` (pretrained backbone weights, when the family
uses one, so the package works offline), ``model.onnx`` (the whole inference as one ONNX graph, for families
whose inference is plain torch, checked against the detector at export; see :mod:`automl_ad.deploy.onnx_export`)
and a short ``README.md``. Loading verifies every hash and the format
version before reading anything, and never unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automl_ad import __version__
from automl_ad.data.imageset import ImageSet
from automl_ad.deploy.onnx_export import export_onnx
from automl_ad.errors import AutomlAdError, UsageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


class PackageError(AutomlAdError):
    """A package is missing, tampered with, truncated or of an unknown format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_package(detector, out: str | Path, thresholds: dict, metrics: dict | None = None,
                   cost: dict | None = None, training: dict | None = None, overwrite: bool = False,
                   parity_images: ImageSet | None = None) -> Path:
    """Write ``detector`` (fitted) with its thresholds as a package at ``out`` (written aside, then moved).
    ``parity_images`` (a few, e.g. held-out normals) check ``model.onnx`` against the detector; without them
    the package has no ``model.onnx``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already holds files; choose another folder or pass --overwrite")
    staging = Path(tempfile.mkdtemp(prefix=".pkg-", dir=out.parent if out.parent.exists() else None))
    try:
        saved = detector.save(staging / "saved")
        shutil.move(saved / "tensors.safetensors", staging / "weights.safetensors")
        record = json.loads((saved / "detector.json").read_text())
        shutil.rmtree(saved)
        backbone = _bundle_backbone(detector, staging)
        if backbone:
            record["params"]["weights"] = backbone["file"]
            record["state"]["weights_identity"] = backbone["identity"]
        (staging / "detector.json").write_text(json.dumps(record, indent=2))
        manifest = {
            "format_version": FORMAT_VERSION, "automl_ad_version": __version__, "family": detector.name,
            "route": detector.route, "params": record["params"], "preprocessing": _preprocessing(detector, backbone),
            "thresholds": thresholds, "metrics": metrics or {}, "cost": cost or {}, "training": training or {},
            "supports_localization": detector.supports_localization,
            "onnx": export_onnx(detector, staging / ONNX_FILE, parity_images)}
        (staging / "README.md").write_text(_readme(manifest))
        manifest["files"] = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _bundle_backbone(detector, staging: Path) -> dict | None:
    """Copy the backbone weights file into the package (local file or hub cache)."""
    params = detector.get_params()
    if "backbone" not in params or not params.get("pretrained", True):
        return None
    source = detector._extractor().spec.weights.file
    if source is None:
        raise PackageError(f"{detector.name}: the backbone weights file cannot be found locally to bundle; fit with "
                           "--weights FILE so the package can work offline")
    target = staging / "backbone.safetensors" if source.endswith(".safetensors") else staging / "backbone.pth"
    if target.suffix == ".pth":
        raise PackageError(f"{source}: only safetensors backbone weights can be bundled (a .pth file would have to "
                           "be unpickled on load); convert it with safetensors first")
    shutil.copyfile(source, target)
    return {"file": target.name, "identity": _sha256(target)}


def _preprocessing(detector, backbone: dict | None) -> dict:
    params = detector.get_params()
    info = {"input_size": params.get("input_size"), "resize": "bilinear, antialiased, aspect ratio not kept",
            "colour": "gray images are repeated to 3 channels" if "backbone" in params else "as the family reads it"}
    if backbone:
        weights = detector._extractor().spec.weights
        info.update(mean=list(weights.mean), std=list(weights.std), backbone=params["backbone"])
    return info


def _readme(manifest: dict) -> str:
    image = manifest["thresholds"].get("image", {})
    return "\n".join([
        f"# automl-ad model package: {manifest['family']} ({manifest['route']})", "",
        f"Made by automl-ad {manifest['automl_ad_version']}, package format {manifest['format_version']}.", "",
        "Use it:", "", "```", "automl-ad predict THIS_FOLDER images/ --out predictions/", "```", "",
        "or from Python: `automl_ad.load_package('THIS_FOLDER').predict(image_or_path)`.", "",
        f"Image threshold {image.get('value')} ({image.get('method')}, target false-alarm rate "
        f"{image.get('target_false_alarm_rate')}); see manifest.json for all thresholds, metrics and costs.",
        "Loading checks the sha256 of every file listed in manifest.json; do not edit the files.", "",
        *_onnx_readme(manifest["onnx"])])


def _onnx_readme(onnx: dict) -> list[str]:
    if not onnx.get("file"):
        return ["## Running model.onnx", "", f"This package has no model.onnx: {onnx['reason']}.", ""]
    spec = onnx["input"]
    return [
        "## Running model.onnx", "",
        f"`{onnx['file']}` (ONNX opset {onnx['opset']}) runs the whole detector without automl-ad: input "
        f"`{spec['name']}`, float32 {spec['layout']} of shape (batch, {spec['channels']}, {spec['size']}, "
        f"{spec['size']}) in [0, 1] - the image resized to {spec['size']}x{spec['size']} ({spec['resize']}), "
        f"{spec['colour']}; the graph normalises. Outputs: `image_scores` (batch,) and `anomaly_maps` "
        f"(batch, {spec['size']}, {spec['size']}); compare with the thresholds in manifest.json. It matched the "
        f"detector within {onnx['parity_relative']:.1e} of the score span on {onnx['parity_images']} images.", "",
        "```python", "import numpy as np, onnxruntime",
        f"session = onnxruntime.InferenceSession('{onnx['file']}', providers=['CPUExecutionProvider'])",
        f"batch = np.zeros((1, {spec['channels']}, {spec['size']}, {spec['size']}), np.float32)  # your images",
        "image_scores, anomaly_maps = session.run(None, {'" + spec["name"] + "': batch})", "```", ""]


@dataclass
class Prediction:
    """One image's result: score, verdict, anomaly map at the image's size (or None) and its binary mask."""

    score: float
    anomalous: bool
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None


class Package:
    """A loaded, verified package."""

    def __init__(self, path: Path, manifest: dict, detector):
        self.path, self.manifest, self.detector = path, manifest, detector

    @property
    def image_threshold(self) -> float:
        return float(self.manifest["thresholds"]["image"]["value"])

    @property
    def pixel_threshold(self) -> float | None:
        pixel = self.manifest["thresholds"].get("pixel")
        return float(pixel["value"]) if pixel else None

    def predict(self, image, threshold: float | None = None) -> Prediction:
        """Score one image (a path, or an array as ``ImageSet.from_arrays`` takes) against the threshold."""
        from automl_ad.data.imageset import ImageSet
        from automl_ad.data.io import load_image, resize_image

        array = load_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        scores = self.detector.score(ImageSet.from_arrays([array]))
        score = float(scores.image_scores[0])
        limit = self.image_threshold if threshold is None else float(threshold)
        amap = mask = None
        if scores.anomaly_maps is not None:
            amap = resize_image(scores.anomaly_maps[0], array.shape[:2])
            if self.pixel_threshold is not None:
                mask = amap > self.pixel_threshold
        return Prediction(score, score > limit, amap, mask)


def load_package(path: str | Path) -> Package:
    """Verify and load a package; a missing, altered or truncated file raises PackageError before any use."""
    from automl_ad.detectors import Detector

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path} is not a readable automl-ad package ({MANIFEST}: {exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{path}: package format {manifest.get('format_version')!r}; this automl-ad "
                           f"({__version__}) reads format {FORMAT_VERSION}. Export it again with this version")
    files = manifest.get("files") or {}
    for required in ("detector.json", "weights.safetensors"):
        if required not in files:
            raise PackageError(f"{path}: the manifest does not list {required}")
    for name, expected in files.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise PackageError(f"{path}: {name} is missing (the package is incomplete)")
        if _sha256(file) != expected:
            raise PackageError(f"{path}: {name} does not match its sha256 in the manifest: the file was changed or "
                               "truncated. Export the package again; do not use this one")
    overrides = {}
    weights = json.loads((path / "detector.json").read_text())["params"].get("weights")
    if weights:
        if weights not in files:
            raise PackageError(f"{path}: backbone weights {weights} are not part of the package")
        overrides["weights"] = str(path / weights)
    try:
        detector = Detector.load(path, params_file="detector.json", tensors_file="weights.safetensors",
                                 overrides=overrides)
    except AutomlAdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a verified but unreadable package is still a package problem
        raise PackageError(f"{path}: the package could not be loaded ({type(exc).__name__}: {exc})") from exc
    return Package(path, manifest, detector)
