"""Name the good images that look unlike the others: defects filed as good, other parts, bad captures.

A model fitted on all the good images learns such an image as normal (a memory bank holds its very patches), so
only held-out scores can show it. The normal training images are dealt into ``SCREEN_FOLDS`` folds; each fold is
scored by the screen family's default (PatchCore: it needs no training schedule and scores a patch by its distance
to the nearest normal patch) fitted on the other folds, at most ``SCREEN_FIT_IMAGES`` of them. An image is named
when its out-of-fold score lies above Tukey's far-out fence: the third quartile plus ``SCREEN_FENCE_IQR``
interquartile ranges of all the out-of-fold scores, a rule without a constant fitted to any dataset. The names are
for a person to check, not a verdict: a defective one belongs in a defect folder (or out of the data); an unusual
good one is fine, it widens what the model accepts.

The screen reads the images at the family's default input (256x256), with the lightest backbone that has weights
here: a search's trials with that backbone and input find its features in the feature cache. Defects too small to
survive that squash (a few pixels of a wide image) are beyond it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from automl_ad.data.dataset import Dataset
from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import (
    SCREEN_FAMILY,
    SCREEN_FENCE_IQR,
    SCREEN_FIT_IMAGES,
    SCREEN_FOLDS,
    SCREEN_MIN_NORMALS,
    SPLIT_SEED,
)
from automl_ad.detectors import create_detector
from automl_ad.folders import write_json_atomically
from automl_ad.progress import track


@dataclass
class NormalScreen:
    """Out-of-fold scores of the good images (highest first) and the fence above which they are named; ``skipped``
    says why nothing was screened (then the rest is empty)."""

    family: str
    backbone: str | None
    folds: int
    fence: float | None = None
    seconds: float = 0.0
    scores: list[tuple[str, float]] = field(default_factory=list)
    skipped: str | None = None
    file: str | None = None  # where :meth:`save` wrote it

    @property
    def suspects(self) -> list[tuple[str, float]]:
        """(image, out-of-fold score) above the fence, highest first."""
        return [(path, score) for path, score in self.scores if self.fence is not None and score > self.fence]

    def to_dict(self) -> dict:
        return {**asdict(self), "suspects": [{"image": p, "score": s} for p, s in self.suspects]}

    def save(self, path: Path) -> Path:
        self.file = str(path)
        write_json_atomically(path, self.to_dict())
        return path


def screen_normals(dataset: Dataset, backbone: str | None, weights: str | None = None, family: str = SCREEN_FAMILY,
                   params: dict | None = None, folds: int = SCREEN_FOLDS, fit_images: int = SCREEN_FIT_IMAGES,
                   seed: int = SPLIT_SEED, progress: bool = False) -> NormalScreen:
    """Out-of-fold scores of ``dataset``'s normal training images (the declared train normals, else all normals)
    under ``family``'s default with ``backbone`` (``weights``: a local file for it) and ``params``, and the images
    above the far-out fence (module docstring)."""
    declared = any(r.split is not None for r in dataset.normal)
    records = dataset.normal_in("train") if declared else dataset.normal
    screen = NormalScreen(family, backbone, folds)
    if backbone is None:
        screen.skipped = "no backbone has weights here (pass --weights FILE)"
        return screen
    if len(records) < max(SCREEN_MIN_NORMALS, 2 * folds):
        screen.skipped = f"{len(records)} good training images; it takes at least {SCREEN_MIN_NORMALS}"
        return screen
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    scores = np.empty(len(records))
    settings = {"backbone": backbone, **({"weights": weights} if weights else {}), **(params or {})}
    for k in track(range(folds), "screening the good images", total=folds, enabled=progress):
        held = np.sort(order[k::folds])
        rest = np.setdiff1d(order, held)
        fit = np.sort(rng.choice(rest, min(fit_images, len(rest)), replace=False))
        detector = create_detector(family, **settings)
        detector.fit(ImageSet.from_records([records[i] for i in fit], dataset))
        scores[held] = detector.score_samples(ImageSet.from_records([records[i] for i in held], dataset)).image_scores
    q1, q3 = np.percentile(scores, [25, 75])
    screen.fence = float(q3 + SCREEN_FENCE_IQR * (q3 - q1))
    screen.scores = [(str(records[i].path), float(scores[i])) for i in np.argsort(-scores, kind="stable")]
    screen.seconds = time.perf_counter() - started
    return screen
