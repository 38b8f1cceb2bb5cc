"""Out-of-fold scores of the training normals (cross-conformal calibration): the model is refitted on k folds of
its training images, each refit scoring the images it left out, so that every training normal gives the score of
a normal image the model has not seen. A threshold then rests on many more normal scores than the held-out ones.

A refit sees (k-1)/k of the training images, so its scores run higher than the full model's on new normal images
(PaDiM on 26 instead of 32 bottles: median 102 against 88). Each refit therefore also scores the held-out normals,
which the full model scored too, and its scores are put on the full model's scale by matching those pairs.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold

from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import CALIBRATION_FOLDS, CALIBRATION_REFIT_MAX_S, SPLIT_SEED
from automl_ad.progress import track


def refit_refusal(detector, n_train: int, folds: int = CALIBRATION_FOLDS,
                  max_seconds: float = CALIBRATION_REFIT_MAX_S) -> str | None:
    """Why ``detector`` is not refitted on folds of its ``n_train`` training images (None: it is): it trains
    iteratively, too few images to fold, or refits predicted to take longer than ``max_seconds``."""
    if detector.iterative:
        return "it trains iteratively, so refitting it on folds of the training images would take as long again"
    if n_train < 2 * folds:
        return f"{n_train} training images are too few to refit on {folds} folds"
    seconds = predicted_refit_seconds(detector, folds)
    if seconds is not None and seconds > max_seconds:
        return f"{folds} refits would take about {seconds:.0f} s (more than {max_seconds:.0f} s)"
    return None


def predicted_refit_seconds(detector, folds: int = CALIBRATION_FOLDS) -> float | None:
    """The seconds ``folds`` refits on (folds-1)/folds of the training images take, from the model's own fit time."""
    fitted = getattr(detector, "fit_seconds_", None)
    return None if fitted is None else fitted * (folds - 1)


def out_of_fold_scores(detector, train: ImageSet, reference: ImageSet, reference_scores: np.ndarray,
                       folds: int = CALIBRATION_FOLDS, progress: bool = True) -> np.ndarray:
    """The image score of each of ``train``'s images by a copy of ``detector`` (same parameters) fitted on the
    other ``folds`` - 1 folds, on the scale of ``detector``'s scores: ``reference`` (held-out normals) scored
    ``reference_scores`` by ``detector`` (:func:`on_scale_of`)."""
    scores = np.empty(len(train), dtype=np.float64)
    splits = KFold(n_splits=folds, shuffle=True, random_state=SPLIT_SEED).split(np.arange(len(train)))
    for fitted_on, left_out in track(splits, "refitting on folds of the training images", total=folds,
                                     enabled=progress):
        refit = clone(detector).fit(train.subset(fitted_on))
        scores[left_out] = on_scale_of(refit.score_samples(train.subset(left_out)).image_scores,
                                       refit.score_samples(reference).image_scores, reference_scores)
    return scores


def on_scale_of(scores: np.ndarray, refit_reference: np.ndarray, full_reference: np.ndarray) -> np.ndarray:
    """A refit's ``scores`` on the full model's scale, matched on the images both scored (``refit_reference``,
    ``full_reference``): multiplied by the median ratio when all of those scores are positive (distances), else
    shifted by the median difference."""
    refit_reference, full_reference = np.asarray(refit_reference, float), np.asarray(full_reference, float)
    if (refit_reference > 0).all() and (full_reference > 0).all():
        return scores * float(np.median(full_reference / refit_reference))
    return scores + float(np.median(full_reference - refit_reference))
