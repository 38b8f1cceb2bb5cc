"""Predict with a package over files or folders: verdicts, heatmap overlays, masks, a CSV and JSON summary."""

from __future__ import annotations

import csv
import json
import math
import re
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from automl_ad.data.io import ImageReadError, read_image, save_png, to_float
from automl_ad.data.layout import describe_skipped, image_files
from automl_ad.errors import UsageError

PREDICTIONS_CSV, PREDICTIONS_JSON = "predictions.csv", "predictions.json"
#: What predict writes into its output folder.
OUTPUT_NAMES = (PREDICTIONS_CSV, PREDICTIONS_JSON, "overlays", "masks")
#: An overlay's or mask's file name: the image's index, then its name.
_WRITTEN_NAME = re.compile(r"\d{5}_.*\.png")


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (recursively) in folders, in a stable order; folders holding an earlier
    ``predict``'s output (its overlays and masks are not parts) are skipped with a warning."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            earlier = sorted(p.parent for p in path.rglob(PREDICTIONS_JSON) if _is_predictions_folder(p.parent))
            for folder in earlier:
                warnings.warn(f"skipping {folder}: it holds an earlier predict's output (its overlays and masks "
                              "are not images of parts)", stacklevel=2)
            images, skipped = image_files(path)
            paths += [p for p in images if not any(folder in p.parents for folder in earlier)]
            skipped = [(p, why) for p, why in skipped if not any(folder in p.parents for folder in earlier)]
            if skipped:
                warnings.warn(f"{path}: {describe_skipped(skipped, path)}", stacklevel=2)
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"{path} does not exist")
    if not paths:
        raise UsageError(f"no image files in {', '.join(inputs)}")
    return paths


def prepare_output(out: str | Path, inputs: list[str], overwrite: bool = False) -> Path:
    """Check ``out`` before any scoring and clear an earlier predict's output there when ``overwrite``: refuse a
    file, a folder inside an input folder (the next predict of that folder would score the overlays), a folder
    whose ``predictions.*``, ``overlays/`` or ``masks/`` are not an earlier predict's, and an earlier predict's
    output without ``overwrite`` (its files would be replaced and its overlays mixed with the new ones)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder for the predictions")
    for item in inputs:
        folder = Path(item).resolve()
        if folder.is_dir() and (out.resolve() == folder or folder in out.resolve().parents):
            raise UsageError(f"--out {out} lies inside the input folder {item}, so a later predict of {item} would "
                             "score its overlays and masks as parts; give an output folder outside the inputs")
    taken = [out / name for name in OUTPUT_NAMES if (out / name).exists()]
    if not taken:
        return out
    if not _is_predictions_folder(out):
        raise UsageError(f"--out {out} already holds {', '.join(p.name for p in taken)}, which an earlier predict "
                         "did not write; give a new or empty folder")
    if not overwrite:
        raise UsageError(f"--out {out} holds an earlier predict's results; pass --overwrite to replace them, or "
                         "give another folder")
    for name in (PREDICTIONS_CSV, PREDICTIONS_JSON):
        (out / name).unlink(missing_ok=True)
    for folder in ("overlays", "masks"):
        for written in (out / folder).glob("*.png"):
            if _WRITTEN_NAME.fullmatch(written.name):
                written.unlink()
    return out


def _is_predictions_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier predict's output: its predictions.json is a list of per-image results."""
    try:
        rows = json.loads((folder / PREDICTIONS_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"image", "verdict"} <= set(r) for r in rows)


def predict_files(package, inputs: list[str], out: str | Path, threshold: float | None = None,
                  progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Score every image; a file that cannot be read (corrupt, truncated, over the pixel limit) is reported in the
    summary with its reason and skipped, and the rest are still scored and summarised. ``note``: how the image
    differs from the training images (:attr:`~automl_ad.deploy.package.Prediction.notes`), empty when it does not.
    ``score_ms``: the model's milliseconds for the image, from the decoded image to score and map (the first
    image's include building the inference session; the overlays and masks of earlier images are written meanwhile
    and share the cores)."""
    from automl_ad.progress import track

    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    out = prepare_output(out, inputs, overwrite)
    paths = collect_images(inputs)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    limit = package.image_threshold if threshold is None else threshold
    with _BackgroundWriter(out) as writer:
        for index, path in enumerate(track(paths, "predicting", enabled=progress)):
            name = f"{index:05d}_{path.stem}.png"
            try:
                image = read_image(path)
            except ImageReadError as exc:
                rows.append({"image": str(path), "score": None, "verdict": "error", "error": str(exc)})
                continue
            started = time.perf_counter()
            result = package.predict(image, threshold)
            rows.append({"image": str(path), "score": result.score,
                         "verdict": "anomalous" if result.anomalous else "normal", "threshold": limit,
                         "score_ms": round(1000 * (time.perf_counter() - started), 1), "error": "",
                         "note": "; ".join(result.notes),
                         **writer.submit(name, to_float(image, package.full_scale), result, package.pixel_threshold)})
    fields = ["image", "score", "verdict", "threshold", "overlay", "mask", "score_ms", "error", "note"]
    with (out / PREDICTIONS_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / PREDICTIONS_JSON).write_text(json.dumps(rows, indent=2))
    return rows


class _BackgroundWriter:
    """Draws and writes each image's overlay and mask on one thread while the next images are scored (PNG encoding
    and most of the drawing release the GIL: 60 images of 3390x460 took 31 s instead of 38 s); at most two wait,
    so memory stays bounded on large images. A failed write (disk full...) is raised by the next submit or on
    exit."""

    def __init__(self, out: Path):
        self.out, self.pending = out, deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automl-ad-predict-writer")

    def submit(self, name: str, image: np.ndarray, result, pixel_threshold: float | None) -> dict:
        """Queue the image's files; their paths for its summary row."""
        while len(self.pending) >= 2:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, name, image, result, pixel_threshold))
        return {**({"overlay": str(self.out / "overlays" / name)} if result.anomaly_map is not None else {}),
                **({"mask": str(self.out / "masks" / name)} if result.mask is not None else {})}

    def _write(self, name: str, image: np.ndarray, result, pixel_threshold: float | None) -> None:
        from automl_ad.figures.heatmaps import overlay

        if result.anomaly_map is not None:
            if pixel_threshold is not None:  # one colour scale for every image: red = twice the threshold
                vmin, vmax = 0.0, 2 * pixel_threshold
            else:
                vmin, vmax = float(result.anomaly_map.min()), float(result.anomaly_map.max()) + 1e-12
            save_png(self.out / "overlays" / name, overlay(image, result.anomaly_map, vmin, vmax, result.mask))
        if result.mask is not None:
            save_png(self.out / "masks" / name, result.mask.astype(np.uint8) * 255)

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self.pending and exc[0] is None:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
