"""The images a search fits on, selects with, and reports on — and the quality it ranks trials by.

Normal training images are split into train and validation (and test, but for a few normals without labelled
defects, which train instead). Labelled defects, when the dataset has them, are
divided between validation (selection) and test (final report); the test part never influences selection.
Without labelled defects, or with fewer than ``MIN_REAL_VALIDATION_DEFECTS`` for validation (then they are ranked
on too, beside them: "mixed"), validation anomalies are synthesised on the held-out normal images
(:mod:`automl_ad.data.synthetic`) and written once to the search's working folder, so every trial reads the same
files (and the feature cache can serve them). Each family is ranked only on anomaly kinds it does not train on
(:func:`automl_ad.data.synthetic.without_trained_kinds`), with as many anomalies as there are normal images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from automl_ad.data.dataset import Dataset
from automl_ad.data.imageset import ImageSet
from automl_ad.data.io import read_image, save_png, to_float
from automl_ad.data.split import SearchSplit
from automl_ad.data.synthetic import (
    KINDS,
    MAX_REGIONS,
    make_anomaly,
    round_kind,
    rounds_needed,
    validation_folder,
    without_trained_kinds,
)
from automl_ad.defaults import (
    MIN_REAL_VALIDATION_DEFECTS,
    MIN_TEST_NORMALS,
    QUALITY_METRICS,
    SEARCH_MIN_SCREEN_VALIDATION,
    SEARCH_REDUCTION_FACTOR,
)
from automl_ad.detectors import Detector, detector_class
from automl_ad.errors import UsageError

VALIDATION_MODES = ("auto", "real", "synthetic")
#: Quality metrics that need the pixel-level ROC curves (slow on many large images, so skipped otherwise).
PIXEL_CURVE_METRICS = ("pixel_auroc", "pixel_ap")


def prepare_search_data(dataset: Dataset, work_dir: str | Path, mode: str = "auto", seed: int = 0,
                        families: Sequence[str] | None = None, compare_synthetic: bool = False) -> SearchSplit:
    """Split ``dataset`` for a search; synthesise validation anomalies under ``work_dir`` when needed, enough
    for every one of ``families`` (None: for any family) to be ranked on kinds it does not train on.
    ``compare_synthetic``: rank on the real defects however few, and synthesise anomalies anyway as
    ``synthetic_reference`` (every trial is scored on them too, to measure how label-free selection would have
    ranked it)."""
    if mode not in VALIDATION_MODES:
        raise UsageError(f"validation must be one of {', '.join(VALIDATION_MODES)}, got {mode!r}")
    # without labelled defects a few test normals could only count false alarms, too coarsely (8 of 40 flat
    # images: in steps of 12%): they train instead, and leave fewer to alarm
    split = dataset.split(seed=seed, min_test_normals=MIN_TEST_NORMALS)
    refusal = too_few_to_search(dataset, split)
    if refusal:
        raise UsageError(refusal)
    normals = [r for r in split.validation if r.is_normal]
    defects = [r for r in split.validation if not r.is_normal]
    train = ImageSet.from_records(split.train, dataset)
    test = ImageSet.from_records(split.test, dataset)
    real = ImageSet.from_records(split.validation, dataset)
    if mode == "real" and not defects:
        raise UsageError(f"{dataset.root}: --validation real needs labelled defect images, and there are none; "
                         "use --validation auto (synthetic anomalies on held-out normal images)")
    trained_on = None if families is None else [detector_class(f).trains_on_anomalies for f in families]
    enough = len(defects) >= MIN_REAL_VALIDATION_DEFECTS or (bool(defects) and compare_synthetic)  # ranked on alone
    if mode == "real" or (mode == "auto" and enough):
        synthetic = _synthetic_validation(normals, dataset, work_dir, seed, trained_on) if compare_synthetic else None
        return SearchSplit(train, real, test, "real", synthetic_reference=synthetic)
    if mode == "auto" and defects:  # too few to rank on alone: beside synthetic anomalies
        synthetic = _synthetic_validation(normals, dataset, work_dir, seed, trained_on)
        return SearchSplit(train, synthetic.concatenated(ImageSet.from_records(defects, dataset)), test, "mixed")
    return SearchSplit(train, _synthetic_validation(normals, dataset, work_dir, seed, trained_on), test, "synthetic",
                       reference=real if defects else None)


def too_few_to_search(dataset: Dataset, split=None) -> str | None:
    """Why a search refuses ``dataset`` (None: it does not): too few normal images to hold some out for
    validation. ``split``: the dataset's search split, when made already."""
    split = split or dataset.split(min_test_normals=MIN_TEST_NORMALS)
    if split.validation:
        return None
    return (f"{dataset.root}: {len(dataset.normal)} normal image(s) are too few to hold some out for validation "
            "beside those a search trains on; add normal (good) images")


def _synthetic_validation(normals, dataset: Dataset, work_dir: str | Path, seed: int,
                          trained_on: list | None) -> ImageSet:
    """The held-out normal images and enough synthetic anomalies on them for every family (see
    :func:`synthesise_validation`)."""
    rounds = len(KINDS) if trained_on is None else rounds_needed(trained_on)
    normal_set = ImageSet.from_records(normals, dataset)
    return normal_set.concatenated(synthesise_validation(normal_set, validation_folder(work_dir, seed), seed,
                                                         rounds))


def synthesise_validation(normals: ImageSet, out: Path, seed: int = 0, rounds: int = 1) -> ImageSet:
    """``rounds`` synthetic anomalies per normal image, round after round (normal image i gets kind
    :func:`~automl_ad.data.synthetic.round_kind` (i, r) in round r), written as PNG with its mask.

    Each anomaly depends only on its source image, its kind and ``seed``, so a file the folder already holds for
    the same sources (paths and content), seed and region cap is reused, and more rounds only add files. 16-bit
    gray images are written at the normals' ``full_scale``.
    """
    paths = [Path(p) for p in normals.paths]
    key = {"sources": [str(p) for p in paths], "hashes": normals.content_hashes, "seed": seed, "kinds": list(KINDS),
           "full_scale": normals.full_scale, "max_regions": MAX_REGIONS}
    manifest = out / "manifest.json"
    reuse = manifest.is_file() and json.loads(manifest.read_text()) == key
    plan = [(i, round_kind(i, r)) for r in range(rounds) for i in range(len(paths))]
    images = [out / f"{i:04d}_{kind}_{paths[i].stem}.png" for i, kind in plan]
    masks = [out / "masks" / f.name for f in images]
    missing = [n for n, (image, mask) in enumerate(zip(images, masks))
               if not (reuse and image.is_file() and mask.is_file())]
    if missing:
        manifest.unlink(missing_ok=True)  # a folder being rewritten is not reused if this is interrupted
        (out / "masks").mkdir(parents=True, exist_ok=True)
        by_source: dict[int, list[int]] = {}
        for n in missing:
            by_source.setdefault(plan[n][0], []).append(n)
        for i, items in by_source.items():
            raw = read_image(paths[i])
            wide = raw.dtype == np.uint16 and raw.ndim == 2  # Pillow writes 16-bit gray, not 16-bit colour
            for n in items:
                kind = plan[n][1]
                anomaly, mask = make_anomaly(to_float(raw, normals.full_scale), kind,
                                             np.random.default_rng([seed, i, KINDS.index(kind)]))
                pixels = np.round(np.clip(anomaly, 0, 1) * ((normals.full_scale or 65535) if wide else 255))
                save_png(images[n], pixels.astype(np.uint16 if wide else np.uint8))
                save_png(masks[n], mask.astype(np.uint8) * 255)
        manifest.write_text(json.dumps(key))
    return ImageSet(paths=images, labels=np.ones(len(images), np.int64), mask_paths=masks,
                    kinds=[kind for _, kind in plan], full_scale=normals.full_scale)


def synthetic_comparison(model_dir: Path, reference: ImageSet, metric: str, far: float) -> dict:
    """``synthetic_*`` metrics and ``synthetic_quality`` of a trial's saved model on the synthetic reference of a
    search ranked on real defects (``--compare-synthetic``), on the kinds its family does not train on. Scored after
    the search, from the saved models, so the comparison costs no trial any time."""
    from automl_ad.evaluation.metrics import evaluate

    detector = Detector.load(model_dir)
    images = without_trained_kinds(reference, detector.trains_on_anomalies)
    scores = detector.score_samples(images)
    metrics = evaluate(images.labels, scores.image_scores, scores.anomaly_maps, images.masks(), far=far,
                       pixel_curves=metric in PIXEL_CURVE_METRICS)
    return {**{f"synthetic_{k}": v for k, v in metrics.items()}, "synthetic_quality": quality(metrics, metric)}


def screening_validation(validation: ImageSet) -> list[int] | None:
    """Indices of the validation images a screening trial is ranked on: 1/η of each group (normal images; the
    anomalies of each kind), spread evenly over the group, but at least ``SEARCH_MIN_SCREEN_VALIDATION`` normal and
    as many anomalous images (all of a smaller group); None when that keeps every image."""
    if validation.labels is None:
        return None
    kinds = validation.kinds or [None] * len(validation)
    groups: dict[tuple, list[int]] = {}
    for i, (label, kind) in enumerate(zip(validation.labels.tolist(), kinds)):
        groups.setdefault((int(label), kind if label else None), []).append(i)
    per_class = np.bincount(validation.labels.astype(int), minlength=2)
    keep = []
    for (label, _), members in groups.items():
        share = max(1 / SEARCH_REDUCTION_FACTOR, SEARCH_MIN_SCREEN_VALIDATION / per_class[label])
        count = min(len(members), math.ceil(share * len(members)))
        keep += [members[i] for i in np.linspace(0, len(members) - 1, count).round().astype(int)]
    return None if len(keep) >= len(validation) else sorted(keep)


def validation_resolution(quality: float, normals: int, anomalies: int) -> float:
    """The smallest quality difference a validation set of ``normals`` and ``anomalies`` images resolves: the
    standard error of an image AUROC equal to ``quality`` (Hanley and McNeil, 1982), used for every metric as the
    validation's resolution. 24 normal and 24 anomalous images resolve about 0.06 at 0.8; 150 and 150 about 0.01
    at 0.95. Infinite when a class is empty. The error shrinks to nothing as the AUROC nears 1, but a validation set
    cannot tell a perfect ranking from one with a pair misordered: it is taken at most one pair (of normals x
    anomalies) below 1, so 2 normal and 2 anomalous images resolve about 0.28, not 0.03 at 0.998."""
    if normals < 1 or anomalies < 1:
        return math.inf
    auc = max(0.5, min(float(quality), 1.0 - 1.0 / (normals * anomalies), 1.0 - 1e-6))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (anomalies - 1) * (q1 - auc * auc) + (normals - 1) * (q2 - auc * auc)) \
        / (normals * anomalies)
    return math.sqrt(max(variance, 0.0))


def quality(metrics: dict, metric: str = "combined") -> float | None:
    """The number trials are ranked by (one of :data:`~automl_ad.defaults.QUALITY_METRICS`). ``combined`` = mean of
    image AUROC and AUPRO when the detector localises and masks exist, else image AUROC."""
    if metric not in QUALITY_METRICS:
        raise UsageError(f"quality metric must be one of {', '.join(QUALITY_METRICS)}, got {metric!r}")
    if metric != "combined":
        return metrics.get(metric)
    parts = [metrics.get("image_auroc"), metrics.get("aupro")]
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts)) if parts else None
