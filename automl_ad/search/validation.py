"""The images a search fits on, selects with, and reports on — and the quality it ranks trials by.

Normal training images are split into train and validation. Labelled defects, when the dataset has them, are
divided between validation (selection) and test (final report); the test part never influences selection.
Without labelled defects, validation anomalies are synthesised on the held-out normal images
(:mod:`automl_ad.data.synthetic`) and written once to the search's working folder, so every trial reads the same
files (and the feature cache can serve them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from automl_ad.data.dataset import Dataset
from automl_ad.data.imageset import ImageSet
from automl_ad.data.split import SearchSplit
from automl_ad.data.io import read_image, to_float
from automl_ad.data.synthetic import KINDS, make_anomaly
from automl_ad.errors import UsageError

VALIDATION_MODES = ("auto", "real", "synthetic")
QUALITY_METRICS = ("combined", "image_auroc", "aupro", "pixel_auroc", "pixel_ap", "image_f1_max")


def prepare_search_data(dataset: Dataset, work_dir: str | Path, mode: str = "auto", seed: int = 0) -> SearchSplit:
    """Split ``dataset`` for a search; synthesise validation anomalies under ``work_dir`` when needed."""
    if mode not in VALIDATION_MODES:
        raise UsageError(f"validation must be one of {', '.join(VALIDATION_MODES)}, got {mode!r}")
    split = dataset.split(seed=seed)
    if not split.validation:
        raise UsageError(f"{dataset.root}: too few normal images to hold some out for validation")
    normals = [r for r in split.validation if r.is_normal]
    defects = [r for r in split.validation if not r.is_normal]
    train = ImageSet.from_records(split.train, dataset)
    test = ImageSet.from_records(split.test, dataset)
    real = ImageSet.from_records(split.validation, dataset)
    if mode == "real" and not defects:
        raise UsageError(f"{dataset.root}: --validation real needs labelled defect images, and there are none; "
                         "use --validation auto (synthetic anomalies on held-out normal images)")
    if mode == "real" or (mode == "auto" and defects):
        return SearchSplit(train, real, test, "real")
    synthetic = synthesise_validation([r.path for r in normals], Path(work_dir) / "synthetic-validation", seed)
    normal_set = ImageSet.from_records(normals, dataset)
    validation = ImageSet(paths=normal_set.paths + synthetic.paths,
                          labels=np.concatenate([np.zeros(len(normals), np.int64), synthetic.labels]),
                          mask_paths=[None] * len(normals) + synthetic.mask_paths,
                          content_hashes=None)
    return SearchSplit(train, validation, test, "synthetic", reference=real if defects else None)


def synthesise_validation(paths: list[Path], out: Path, seed: int = 0) -> ImageSet:
    """One synthetic anomaly per normal image (kinds in turn), written as PNG with its mask; reused when the
    folder already holds the same set (same sources, seed and kinds)."""
    from PIL import Image

    key = {"sources": [str(p) for p in paths], "seed": seed, "kinds": list(KINDS)}
    manifest = out / "manifest.json"
    images = [out / f"{i:04d}_{KINDS[i % len(KINDS)]}_{p.stem}.png" for i, p in enumerate(paths)]
    masks = [out / "masks" / f.name for f in images]
    if not (manifest.is_file() and json.loads(manifest.read_text()) == key and all(m.is_file() for m in masks)):
        (out / "masks").mkdir(parents=True, exist_ok=True)
        for i, (source, image_path, mask_path) in enumerate(zip(paths, images, masks)):
            raw = read_image(source)
            rng = np.random.default_rng([seed, i])
            anomaly, mask = make_anomaly(to_float(raw), KINDS[i % len(KINDS)], rng)
            wide = raw.dtype == np.uint16 and raw.ndim == 2  # Pillow writes 16-bit gray, not 16-bit colour
            pixels = np.round(np.clip(anomaly, 0, 1) * (65535 if wide else 255)).astype(np.uint16 if wide else np.uint8)
            Image.fromarray(pixels).save(image_path)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        manifest.write_text(json.dumps(key))
    return ImageSet(paths=images, labels=np.ones(len(images), np.int64), mask_paths=masks)


def quality(metrics: dict, metric: str = "combined") -> float | None:
    """The number trials are ranked by. ``combined`` = mean of image AUROC and AUPRO when the detector
    localises and masks exist, else image AUROC."""
    if metric not in QUALITY_METRICS:
        raise UsageError(f"quality metric must be one of {', '.join(QUALITY_METRICS)}, got {metric!r}")
    if metric != "combined":
        return metrics.get(metric)
    parts = [metrics.get("image_auroc"), metrics.get("aupro")]
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts)) if parts else None
