"""Predict with a package over files or folders: verdicts, heatmap overlays, masks, a CSV and JSON summary."""

from __future__ import annotations

import csv
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from automl_ad.data.io import ImageReadError, is_image_file, read_image, save_png, to_float
from automl_ad.errors import UsageError


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (recursively) in folders, in a stable order."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"{path} does not exist")
    if not paths:
        raise UsageError(f"no image files in {', '.join(inputs)}")
    return paths


def predict_files(package, inputs: list[str], out: str | Path, threshold: float | None = None,
                  progress: bool = True) -> list[dict]:
    """Score every image; a file that cannot be read (corrupt, truncated, over the pixel limit) is reported in the
    summary with its reason and skipped, and the rest are still scored and summarised. ``note``: how the image
    differs from the training images (:attr:`~automl_ad.deploy.package.Prediction.notes`), empty when it does not.
    ``score_ms``: the model's milliseconds for the image, from the decoded image to score and map (the first
    image's include building the inference session; the overlays and masks of earlier images are written meanwhile
    and share the cores)."""
    from automl_ad.progress import track

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder for the predictions")
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
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "predictions.json").write_text(json.dumps(rows, indent=2))
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
