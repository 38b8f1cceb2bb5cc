"""Model packages: a self-describing, tamper-evident folder that predicts with calibrated thresholds.

Layout: ``manifest.json`` (``"kind": "automl-ad-package"``, format, versions, family, parameters, preprocessing,
thresholds, metrics, costs, training-data fingerprint, sha256 of every other file, and an integrity record),
``detector.json`` (the detector's fitted state), ``weights.safetensors`` (its arrays), ``backbone.safetensors``
(pretrained backbone weights, when the family uses one, so the package works offline), ``model.onnx`` (the whole
inference as one ONNX graph, for families whose inference is plain torch, checked against the detector at export;
see :mod:`automl_ad.deploy.onnx_export`) and a short ``README.md``.

Integrity: ``integrity.core_sha256`` is the sha256 of the canonical JSON of every other manifest field (so an
edited threshold is noticed) and, when :data:`~automl_ad.defaults.PACKAGE_KEY_ENV` is set at export,
``integrity.hmac_sha256`` signs it with that key. A hash detects accidental or naive edits; only the HMAC detects
deliberate ones (whoever edits a file can recompute a hash, not the HMAC without the key).

Loading validates every manifest field, verifies the integrity record and every file's hash, refuses symbolic
links and anything that is not a regular file, and never unpickles: JSON and safetensors only (backbone weights
must be the package's own ``backbone.safetensors``, so nothing can reach ``torch.load``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automl_ad.data.geometry import Geometry
from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import PACKAGE_KEY_ENV, PRECISIONS
from automl_ad.deploy.appearance import differences
from automl_ad.deploy.onnx_export import export_onnx
from automl_ad.detectors import Detector, list_detectors
from automl_ad.detectors.graph_based import GraphDetector
from automl_ad.errors import AutomlAdError, ConfigError, UsageError
from automl_ad.folders import check_output_folder, write_output_folder
from automl_ad.version import __version__

FORMAT_VERSION = 2
PACKAGE_KIND = "automl-ad-package"
MANIFEST = "manifest.json"
DETECTOR_FILE, WEIGHTS_FILE, BACKBONE_FILE = "detector.json", "weights.safetensors", "backbone.safetensors"
ONNX_FILE, README_FILE = "model.onnx", "README.md"
#: Every file a manifest may list (the manifest itself is not listed).
PACKAGE_FILES = frozenset({DETECTOR_FILE, WEIGHTS_FILE, BACKBONE_FILE, ONNX_FILE, README_FILE})
#: Largest manifest.json and detector.json read; a larger one is refused before it is parsed.
MAX_MANIFEST_BYTES = 1 << 20
MAX_DETECTOR_JSON_BYTES = 64 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PackageError(AutomlAdError):
    """A package is missing, tampered with, truncated, malformed or of an unknown format: the input is unusable as
    it is, a data problem (exit code 3)."""

    exit_code = 3


def export_package(detector, out: str | Path, thresholds: dict, metrics: dict | None = None,
                   cost: dict | None = None, training: dict | None = None, overwrite: bool = False,
                   parity_images: ImageSet | None = None, protected: tuple = (),
                   operating: list[dict] | None = None) -> Path:
    """Write ``detector`` (fitted) with its thresholds as a package at ``out``: written and verified in a staging
    folder, then swapped in (:func:`automl_ad.folders.write_output_folder`; with ``overwrite`` it replaces only an
    automl-ad package, never a folder holding a ``protected`` path). ``parity_images`` (a few, e.g. held-out
    normals) check ``model.onnx`` against the detector; without them the package has no ``model.onnx``.
    ``operating`` is the threshold → (false-alarm rate, detection rate) table measured on validation."""
    def fill(folder: Path) -> None:
        _write_package(detector, folder, thresholds, metrics, cost, training, parity_images, operating or [])
        verify_package(folder)  # never hand out a package that loading would refuse

    return write_output_folder(out, fill, what="package", replaceable=package_folder_problem, overwrite=overwrite,
                               protected=protected)


def check_package_target(out: str | Path, overwrite: bool = False, protected: tuple = ()) -> None:
    """Raise UsageError now if :func:`export_package` would refuse ``out`` (to fail before a long export)."""
    check_output_folder(out, what="package", replaceable=package_folder_problem, overwrite=overwrite,
                        protected=protected)


def _write_package(detector, folder: Path, thresholds: dict, metrics: dict | None, cost: dict | None,
                   training: dict | None, parity_images: ImageSet | None, operating: list[dict]) -> None:
    saved = detector.save(folder / "saved")
    shutil.move(saved / "tensors.safetensors", folder / WEIGHTS_FILE)
    record = json.loads((saved / "detector.json").read_text())
    shutil.rmtree(saved)
    backbone = _bundle_backbone(detector, folder)
    if backbone:
        record["params"]["weights"] = backbone["file"]
        record["state"]["weights_identity"] = backbone["identity"]
    (folder / DETECTOR_FILE).write_text(json.dumps(record, indent=2))
    manifest = {
        "kind": PACKAGE_KIND, "format_version": FORMAT_VERSION, "automl_ad_version": __version__,
        "family": detector.name, "route": detector.route, "params": record["params"],
        "preprocessing": _preprocessing(detector, backbone), "thresholds": thresholds, "metrics": metrics or {},
        "cost": cost or {}, "training": training or {}, "operating_points": operating,
        "supports_localization": detector.supports_localization,
        "onnx": export_onnx(detector, folder / ONNX_FILE, parity_images)}
    (folder / README_FILE).write_text(_readme(manifest))
    manifest["files"] = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    core = json.loads(json.dumps(manifest))  # as a reader will see it: tuples as lists, keys as strings
    core["integrity"] = _integrity(core)
    (folder / MANIFEST).write_text(json.dumps(core, indent=2))


def package_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not (only) an automl-ad package, or None when it is: its manifest says
    ``"kind": "automl-ad-package"`` and it holds nothing but the manifest and the regular files it lists."""
    if not (folder / MANIFEST).is_file() or (folder / MANIFEST).is_symlink():
        return f"no {MANIFEST}"
    try:
        manifest = _read_json(folder, MANIFEST, MAX_MANIFEST_BYTES)
    except PackageError as exc:
        return str(exc)
    if manifest.get("kind") != PACKAGE_KIND:
        return f'its {MANIFEST} does not say "kind": "{PACKAGE_KIND}"'
    listed = manifest.get("files")
    allowed = {MANIFEST} | (set(listed) & PACKAGE_FILES if isinstance(listed, dict) else set())
    with os.scandir(folder) as entries:
        others = sorted(entry.name for entry in entries if entry.name not in allowed or entry.is_symlink()
                        or not entry.is_file(follow_symlinks=False))
    if others:
        return f"it also holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
    return None


def _bundle_backbone(detector, staging: Path) -> dict | None:
    """Copy the backbone weights file into the package (local file or hub cache)."""
    params = detector.get_params()
    if "backbone" not in params or not params.get("pretrained", True):
        return None
    source = detector._extractor().spec.weights.file
    if source is None:
        raise UsageError(f"{detector.name}: the backbone weights file cannot be found locally to bundle; fit with "
                         "--weights FILE so the package can work offline")
    target = staging / "backbone.safetensors" if source.endswith(".safetensors") else staging / "backbone.pth"
    if target.suffix == ".pth":
        raise UsageError(f"{source}: only safetensors backbone weights can be bundled (a .pth file would have to "
                         "be unpickled on load); convert it with safetensors first")
    shutil.copyfile(source, target)
    return {"file": target.name, "identity": _sha256(target)}


def _preprocessing(detector, backbone: dict | None) -> dict:
    params = detector.get_params()
    geometry = detector.input_geometry()
    info = {"input_size": params.get("input_size"), "geometry": None if geometry is None else geometry.to_dict(),
            "resize": "bilinear, antialiased; " + ("aspect ratio not kept" if geometry is None
                                                   else geometry.describe()),
            "colour": "gray images are repeated to 3 channels" if "backbone" in params else "as the family reads it",
            "pixel_scale": f"to [0, 1]: 8-bit pixels / 255, 16-bit pixels / {detector.full_scale_ or 65535}",
            "full_scale": detector.full_scale_}
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
        f"Pixels {manifest['preprocessing'].get('pixel_scale', 'to [0, 1]: 8-bit / 255, 16-bit / 65535')}.", "",
        *_onnx_readme(manifest["onnx"])])


def _onnx_readme(onnx: dict) -> list[str]:
    if not onnx.get("file"):
        return ["## Running model.onnx", "", f"This package has no model.onnx: {onnx['reason']}.", ""]
    spec = onnx["input"]
    height, width = spec["size"], spec.get("width", spec["size"])
    geometry = None if spec.get("geometry") is None else Geometry.from_dict(spec["geometry"])
    text = [
        "## Running model.onnx", "",
        f"`{onnx['file']}` (ONNX opset {onnx['opset']}) runs the whole detector on network inputs without "
        f"automl-ad: input `{spec['name']}`, float32 {spec['layout']} of shape (batch, {spec['channels']}, "
        f"{height}, {width}) in [0, 1], {spec['colour']}; the graph normalises. Outputs: `image_scores` (batch,) "
        "and `anomaly_maps` (batch, h, w), one per network input; compare with the thresholds in manifest.json. "
        f"With the loop below it matched the detector within {onnx['parity_relative']:.1e} of the score span on "
        f"{onnx['parity_images']} images.", "",
        "Input geometry (`preprocessing.geometry` in manifest.json): "
        f"{'squash' if geometry is None else geometry.describe()}."]
    if geometry is None or geometry.mode == "squash":
        return [*text, f"Each image is one network input: resize it to {height}x{width} (bilinear, antialiased, "
                       "aspect ratio not kept).", "",
                "```python", "import numpy as np, onnxruntime",
                f"session = onnxruntime.InferenceSession('{onnx['file']}', providers=['CPUExecutionProvider'])",
                f"batch = np.zeros((1, {spec['channels']}, {height}, {width}), np.float32)  # your resized images",
                "image_scores, anomaly_maps = session.run(None, {'" + spec["name"] + "': batch})", "```", ""]
    return [*text, "An image becomes several network inputs (tiles) or one padded input (letterbox), and their "
                   "outputs go back to the image; `automl_ad.data.geometry` does each step: `tile_grid` plans the "
                   "resize, padding and tile origins for the image size, `to_tiles` cuts the network inputs, and "
                   "`stitch` resizes each output map to its tile, averages overlaps, crops the padding and resizes "
                   "to the image. The image score is the largest score of its network inputs; the map has the "
                   "image's size. `automl-ad predict` and `Package.predict` run this loop.", "",
            "```python", "import json, numpy as np, onnxruntime",
            "from automl_ad.data.geometry import Geometry, stitch, tile_grid, to_tiles",
            "geometry = Geometry.from_dict(json.load(open('manifest.json'))['preprocessing']['geometry'])",
            f"session = onnxruntime.InferenceSession('{onnx['file']}', providers=['CPUExecutionProvider'])",
            "image = np.zeros((1000, 2000, 3), np.float32)  # your image, float in [0, 1], (H, W, 3)",
            "grid = tile_grid(geometry, image.shape[:2])",
            "inputs = to_tiles(image, grid).transpose(0, 3, 1, 2)" + (
                "" if spec["channels"] == 3 else "  # (gray families: luma first, then [:, None])"),
            "scores, maps = session.run(None, {'" + spec["name"] + "': np.ascontiguousarray(inputs)})",
            "image_score, anomaly_map = scores.max(), stitch(maps, grid)", "```", ""]


@dataclass
class Prediction:
    """One image's result: score, verdict, anomaly map at the image's size (or None), its binary mask, and how the
    image differs from the training images (:func:`~automl_ad.deploy.appearance.differences`; empty if not)."""

    score: float
    anomalous: bool
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None
    notes: tuple[str, ...] = ()


class Package:
    """A loaded, verified package."""

    def __init__(self, path: Path, manifest: dict, detector):
        self.path, self.manifest, self.detector = path, manifest, detector

    @property
    def full_scale(self) -> int | None:
        """What the training images' 16-bit pixels were divided by (None: 65535); predict reads images so."""
        return self.detector.full_scale_

    @property
    def image_threshold(self) -> float:
        return float(self.manifest["thresholds"]["image"]["value"])

    @property
    def pixel_threshold(self) -> float | None:
        pixel = self.manifest["thresholds"].get("pixel")
        return float(pixel["value"]) if pixel else None

    def predict(self, image, threshold: float | None = None) -> Prediction:
        """Score one image (a path, or an array as ``ImageSet.from_arrays`` takes: 16-bit pixels as stored, read at
        the training images' :attr:`full_scale`; floats in [0, 1] as they are) against the threshold. The
        detector runs the geometry's loop (network inputs of ``preprocessing.geometry``, per-input outputs stitched
        back: :meth:`~automl_ad.detectors.base.Detector.per_image_scores`), as the README's loop around
        ``model.onnx`` does; the map has the image's size."""
        from automl_ad.data.io import read_image, resize_image

        array = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        scores = self.detector.score_samples(ImageSet.from_arrays([array]))
        score = float(scores.image_scores[0])
        limit = self.image_threshold if threshold is None else float(threshold)
        amap = mask = None
        if scores.anomaly_maps is not None:
            amap = resize_image(scores.anomaly_maps[0], array.shape[:2])
            if self.pixel_threshold is not None:
                mask = amap > self.pixel_threshold
        return Prediction(score, score > limit, amap, mask,
                          tuple(differences(array, self.manifest["training"].get("images"), self.full_scale)))


def load_package(path: str | Path) -> Package:
    """Verify (:func:`verify_package`) and load a package; anything wrong raises PackageError before any use."""
    path = Path(path)
    manifest = verify_package(path)
    weights = manifest["params"].get("weights")
    overrides = {"weights": str(path / weights)} if weights else {}
    try:
        detector = Detector.load(path, params_file=DETECTOR_FILE, tensors_file=WEIGHTS_FILE, overrides=overrides)
    except AutomlAdError:
        raise
    except Exception as exc:
        raise PackageError(f"{path}: the package could not be loaded ({type(exc).__name__}: {exc})") from exc
    if manifest["onnx"].get("file") and isinstance(detector, GraphDetector):
        detector.use_inference_model(_self_contained_onnx(path))
    return Package(path, manifest, detector)


def _self_contained_onnx(path: Path) -> bytes:
    """The package's model.onnx (its hash already verified), refused when any tensor keeps its data in an external
    file: ONNX Runtime would read that file, and a package must never make it open paths outside itself."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    with _open_regular(path / ONNX_FILE) as handle:
        data = handle.read()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # any parse failure means the same: not a usable model
        raise PackageError(f"{path}: {ONNX_FILE} is not a valid ONNX model ({type(exc).__name__}). Export the "
                           "package again; do not use this one") from exc
    if any(uses_external_data(tensor) for tensor in _onnx_tensors(model.graph)):
        raise PackageError(f"{path}: {ONNX_FILE} refers to external data files; a package's model holds all its "
                           "weights. Export the package again; do not use this one")
    return data


def _onnx_tensors(graph):
    """Every tensor of an ONNX graph: initializers (dense and sparse) and node attributes, subgraphs included."""
    from onnx import AttributeProto

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == AttributeProto.TENSORS:
                yield from attribute.tensors
            elif attribute.type == AttributeProto.SPARSE_TENSOR:
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            elif attribute.type == AttributeProto.GRAPH:
                yield from _onnx_tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _onnx_tensors(subgraph)


def verify_package(path: str | Path) -> dict:
    """Check a package without loading its detector and return its manifest: only regular files, no symbolic
    links; every manifest field valid; the manifest's integrity record (and signature when
    :data:`~automl_ad.defaults.PACKAGE_KEY_ENV` is set); every listed file's sha256; ``detector.json`` describing
    the manifest's detector, with the package's own safetensors backbone weights. Raises PackageError."""
    path = Path(path)
    if not path.is_dir():
        raise PackageError(f"{path} is not a package folder (written by `automl-ad export`)")
    with os.scandir(path) as entries:
        links = sorted(entry.name for entry in entries if entry.is_symlink())
    if links:
        raise PackageError(f"{path}: {links[0]} is a symbolic link; a package holds only regular files (a link can "
                           "point outside it). Export the package again; do not use this one")
    _check_regular(path, MANIFEST)
    manifest = _read_json(path, MANIFEST, MAX_MANIFEST_BYTES)
    _check_format(path, manifest)
    _check_manifest(path, manifest)
    _check_integrity(path, manifest)
    for name, expected in manifest["files"].items():
        _check_regular(path, name)
        if _sha256(path / name) != expected:
            raise PackageError(f"{path}: {name} does not match its sha256 in the manifest: the file was changed or "
                               "truncated. Export the package again; do not use this one")
    _check_detector_record(path, manifest, _read_json(path, DETECTOR_FILE, MAX_DETECTOR_JSON_BYTES))
    return manifest


# --- integrity -------------------------------------------------------------------------------------------------
def _core_bytes(manifest: dict) -> bytes:
    """Canonical JSON of every manifest field except the integrity record."""
    core = {key: value for key, value in manifest.items() if key != "integrity"}
    return json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _package_key() -> bytes | None:
    key = os.environ.get(PACKAGE_KEY_ENV, "")
    return key.encode() if key else None


def _integrity(core: dict) -> dict:
    data = _core_bytes(core)
    record = {"core_sha256": hashlib.sha256(data).hexdigest()}
    key = _package_key()
    if key:
        record["hmac_sha256"] = hmac.new(key, data, hashlib.sha256).hexdigest()
    return record


def _check_integrity(path: Path, manifest: dict) -> None:
    integrity, data = manifest["integrity"], _core_bytes(manifest)
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), integrity["core_sha256"]):
        raise PackageError(f"{path}: {MANIFEST} was changed after export (its fields no longer match "
                           "integrity.core_sha256; e.g. a threshold was edited). Export the package again; do not "
                           "use this one")
    key = _package_key()
    if key is None:
        return
    if "hmac_sha256" not in integrity:
        raise PackageError(f"{path}: {PACKAGE_KEY_ENV} is set but the package is not signed; export it again with "
                           f"{PACKAGE_KEY_ENV} set, or unset it to accept unsigned packages")
    if not hmac.compare_digest(hmac.new(key, data, hashlib.sha256).hexdigest(), integrity["hmac_sha256"]):
        raise PackageError(f"{path}: the package signature does not match the key in {PACKAGE_KEY_ENV}: it was "
                           "signed with another key or altered after export. Do not use this package")


# --- reading files ---------------------------------------------------------------------------------------------
def _check_regular(path: Path, name: str) -> None:
    try:
        mode = os.lstat(path / name).st_mode
    except FileNotFoundError:
        raise PackageError(f"{path}: {name} is missing (the package is incomplete)") from None
    except OSError as exc:
        raise PackageError(f"{path}: {name} cannot be read ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        raise PackageError(f"{path}: {name} is not a regular file; export the package again")


def _open_regular(file: Path):
    """A binary handle on ``file``, refusing symbolic links and anything but a regular file (never blocks)."""
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise PackageError(f"{file} is not a regular file")
    return handle


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(file) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unique_keys(pairs: list) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _read_json(path: Path, name: str, limit: int) -> dict:
    """The JSON object in ``path/name``, at most ``limit`` bytes, without duplicate keys."""
    try:
        with _open_regular(path / name) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PackageError(f"{path} is not a readable automl-ad package ({name}: {exc.strerror})") from exc
    if len(data) > limit:
        raise PackageError(f"{path}: {name} is larger than {limit >> 20} MiB, far more than automl-ad writes; "
                           "refusing to read it")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackageError(f"{path}: {name} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise PackageError(f"{path}: {name} holds a JSON {type(value).__name__}, not an object")
    return value


# --- validation ------------------------------------------------------------------------------------------------
#: Manifest fields and their JSON types (every one required, no others allowed).
_MANIFEST_FIELDS = {
    "kind": str, "format_version": int, "automl_ad_version": str, "family": str, "route": str, "params": dict,
    "preprocessing": dict, "thresholds": dict, "metrics": dict, "cost": dict, "training": dict,
    "operating_points": list, "supports_localization": bool, "onnx": dict, "files": dict, "integrity": dict}
_THRESHOLD_FIELDS = {"value", "method", "target_false_alarm_rate", "empirical", "evt", "n_normal", "n_out_of_fold",
                     "note"}
_PREPROCESSING_FIELDS = {"input_size", "geometry", "resize", "colour", "mean", "std", "backbone", "pixel_scale",
                         "full_scale"}


def _field_error(path: Path, field: str, problem: str) -> PackageError:
    return PackageError(f"{path}: {MANIFEST} field '{field}' {problem}; the package is damaged or was not written "
                        "by automl-ad. Export it again")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_format(path: Path, manifest: dict) -> None:
    version = manifest.get("format_version")
    if manifest.get("kind") != PACKAGE_KIND and version != 1:
        raise PackageError(f'{path}: {MANIFEST} does not say "kind": "{PACKAGE_KIND}"; this is not an automl-ad '
                           "model package")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: package format {version!r}; this automl-ad ({__version__}) reads format "
                           f"{FORMAT_VERSION}. Export it again with this version")


def _check_manifest(path: Path, manifest: dict) -> None:
    """Every field present, of its type and meaning; a PackageError names the first field that is not."""
    for field, kind in _MANIFEST_FIELDS.items():
        if field not in manifest:
            raise _field_error(path, field, "is missing")
        value = manifest[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _field_error(path, field, f"must be a JSON {_json_type(kind)}, not {_json_type(type(value))}")
    unknown = sorted(set(manifest) - set(_MANIFEST_FIELDS))
    if unknown:
        raise _field_error(path, unknown[0], "is not a field of this format")
    if manifest["family"] not in list_detectors():
        raise _field_error(path, "family", f"names {manifest['family']!r}, not a known family "
                           f"({', '.join(list_detectors())})")
    _check_files(path, manifest["files"])
    _check_thresholds(path, manifest["thresholds"])
    _check_preprocessing(path, manifest["preprocessing"])
    _check_onnx(path, manifest["onnx"], manifest["files"])
    _check_operating_points(path, manifest["operating_points"])
    for key, value in manifest["cost"].items():
        if value is not None and not _is_number(value):
            raise _field_error(path, f"cost.{key}", "must be a number or null")
    integrity = manifest["integrity"]
    for key in sorted(set(integrity) | {"core_sha256"}):
        if key not in ("core_sha256", "hmac_sha256"):
            raise _field_error(path, f"integrity.{key}", "is not a field of this format")
        if not isinstance(integrity.get(key), str) or not _HEX64.fullmatch(integrity[key]):
            raise _field_error(path, f"integrity.{key}", "must be 64 lowercase hex digits")


_OPERATING_FIELDS = {"target_false_alarm_rate", "threshold", "false_alarm_rate", "detection_rate"}


def _check_operating_points(path: Path, table: list) -> None:
    for i, row in enumerate(table):
        field = f"operating_points[{i}]"
        if not isinstance(row, dict) or set(row) != _OPERATING_FIELDS:
            raise _field_error(path, field, f"must be an object with {', '.join(sorted(_OPERATING_FIELDS))}")
        if not _is_finite(row["threshold"]):
            raise _field_error(path, f"{field}.threshold", "must be a finite number")
        for key in ("target_false_alarm_rate", "false_alarm_rate", "detection_rate"):
            value = row[key]
            if not (value is None and key == "detection_rate") and not (_is_finite(value) and 0 <= value <= 1):
                raise _field_error(path, f"{field}.{key}", "must be a rate between 0 and 1")


def _json_type(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


def _check_files(path: Path, files: dict) -> None:
    for name, digest in files.items():
        if name not in PACKAGE_FILES:
            raise _field_error(path, f"files.{name}",
                               f"is not a package file (one of {', '.join(sorted(PACKAGE_FILES))})")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _field_error(path, f"files.{name}", "must be a sha256 of 64 lowercase hex digits")
    for required in (DETECTOR_FILE, WEIGHTS_FILE):
        if required not in files:
            raise _field_error(path, "files", f"does not list {required}")


def _check_thresholds(path: Path, thresholds: dict) -> None:
    if "image" not in thresholds:
        raise _field_error(path, "thresholds.image", "is missing")
    for name, threshold in thresholds.items():
        field = f"thresholds.{name}"
        if name == "active":
            if not isinstance(threshold, str) or threshold not in thresholds or threshold == "active":
                raise _field_error(path, field, f"names {threshold!r}, which is not one of the thresholds")
            continue
        if name == "pixel" and threshold is None:
            continue
        if not isinstance(threshold, dict):
            raise _field_error(path, field, "must be an object")
        if not _is_finite(threshold.get("value")):
            raise _field_error(path, f"{field}.value", "must be a finite number")
        unknown = sorted(set(threshold) - _THRESHOLD_FIELDS)
        if unknown:
            raise _field_error(path, f"{field}.{unknown[0]}", "is not a field of a threshold")
        rate = threshold.get("target_false_alarm_rate")
        if rate is not None and not (_is_finite(rate) and 0 < rate < 1):
            raise _field_error(path, f"{field}.target_false_alarm_rate", "must be a number between 0 and 1, or null")
        for key in ("empirical", "evt"):
            if threshold.get(key) is not None and not _is_finite(threshold[key]):
                raise _field_error(path, f"{field}.{key}", "must be a finite number or null")
        for key in ("n_normal", "n_out_of_fold"):
            if key in threshold and not _is_count(threshold[key]):
                raise _field_error(path, f"{field}.{key}", "must be a whole number of images")
        for key in ("method", "note"):
            if key in threshold and not isinstance(threshold[key], str):
                raise _field_error(path, f"{field}.{key}", "must be a string")


def _check_preprocessing(path: Path, preprocessing: dict) -> None:
    unknown = sorted(set(preprocessing) - _PREPROCESSING_FIELDS)
    if unknown:
        raise _field_error(path, f"preprocessing.{unknown[0]}", "is not a field of this format")
    size = preprocessing.get("input_size")
    if size is not None and not (_is_count(size) and size > 0):
        raise _field_error(path, "preprocessing.input_size", "must be a positive whole number of pixels or null")
    _check_geometry(path, "preprocessing.geometry", preprocessing.get("geometry"))
    scale = preprocessing.get("full_scale")
    if scale is not None and not (_is_count(scale) and 255 <= scale <= 65535):
        raise _field_error(path, "preprocessing.full_scale", "must be a whole number in 255-65535 or null")
    for key in ("resize", "colour", "backbone", "pixel_scale"):
        if key in preprocessing and not isinstance(preprocessing[key], str):
            raise _field_error(path, f"preprocessing.{key}", "must be a string")
    for key in ("mean", "std"):
        values = preprocessing.get(key)
        if key in preprocessing and not (isinstance(values, list) and len(values) == 3
                                         and all(_is_finite(v) for v in values)):
            raise _field_error(path, f"preprocessing.{key}", "must be a list of 3 finite numbers (R, G, B)")


def _check_geometry(path: Path, field: str, geometry) -> None:
    """A recorded input geometry (null: the default squash) must be one automl-ad can run."""
    if geometry is None:
        return
    try:
        Geometry.from_dict(geometry)
    except (ConfigError, TypeError) as exc:
        raise _field_error(path, field, f"is not an input geometry ({exc})") from exc


def _check_onnx(path: Path, onnx: dict, files: dict) -> None:
    file = onnx.get("file")
    if file is None:
        if not isinstance(onnx.get("reason"), str):
            raise _field_error(path, "onnx.reason", "must say why the package has no model.onnx")
        if ONNX_FILE in files:
            raise _field_error(path, "onnx.file", f"is null but files lists {ONNX_FILE}")
        return
    if file != ONNX_FILE or file not in files:
        raise _field_error(path, "onnx.file", f"must be {ONNX_FILE} (listed in files) or null")
    spec = onnx.get("input")
    if not isinstance(spec, dict):
        raise _field_error(path, "onnx.input", "must be an object")
    for key in ("name", "layout", "resize", "colour"):
        if not isinstance(spec.get(key), str):
            raise _field_error(path, f"onnx.input.{key}", "must be a string")
    if spec.get("channels") not in (1, 3) or isinstance(spec.get("channels"), bool):
        raise _field_error(path, "onnx.input.channels", "must be 1 or 3")
    if not (_is_count(spec.get("size")) and spec["size"] > 0):
        raise _field_error(path, "onnx.input.size", "must be a positive whole number of pixels")
    if "width" in spec and not (_is_count(spec["width"]) and spec["width"] > 0):
        raise _field_error(path, "onnx.input.width", "must be a positive whole number of pixels")
    _check_geometry(path, "onnx.input.geometry", spec.get("geometry"))
    if not _is_count(onnx.get("opset")):
        raise _field_error(path, "onnx.opset", "must be a whole number")
    if not _is_finite(onnx.get("parity_relative")):
        raise _field_error(path, "onnx.parity_relative", "must be a finite number")
    if not _is_count(onnx.get("parity_images")):
        raise _field_error(path, "onnx.parity_images", "must be a whole number of images")
    precision = onnx.get("backbone_precision", "fp32")
    if precision not in PRECISIONS:
        raise _field_error(path, "onnx.backbone_precision", f"must be one of {', '.join(PRECISIONS)}")
    if (precision == "int8") != isinstance(onnx.get("quantisation"), str):
        raise _field_error(path, "onnx.quantisation", "must describe the quantisation of an int8 backbone, and "
                           "only of one")


def _check_detector_record(path: Path, manifest: dict, record: dict) -> None:
    """``detector.json`` describes the manifest's detector; backbone weights can only be the package's own
    ``backbone.safetensors`` (a ``.pth`` would be unpickled by ``torch.load``, which can run code)."""
    for key, kind in (("family", str), ("params", dict), ("state", dict)):
        if not isinstance(record.get(key), kind):
            raise PackageError(f"{path}: {DETECTOR_FILE} field '{key}' is missing or not a JSON {_json_type(kind)}; "
                               "export the package again")
    if record["family"] != manifest["family"] or _canonical(record["params"]) != _canonical(manifest["params"]):
        raise PackageError(f"{path}: {DETECTOR_FILE} describes another detector than {MANIFEST} (family or "
                           "parameters differ); export the package again")
    params = manifest["params"]
    weights = params.get("weights")
    if weights is None:
        if "backbone" in params and params.get("pretrained", True) is not False:
            raise _field_error(path, "params.weights", "is empty although the backbone is pretrained: its weights "
                               "are not in the package and would be fetched from outside it")
        return
    if weights != BACKBONE_FILE or weights not in manifest["files"]:
        raise _field_error(path, "params.weights", f"names {weights!r}; backbone weights must be the package's own "
                           f"{BACKBONE_FILE}, listed in files (a .pth file would be unpickled by torch.load, which "
                           "can run code)")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
