"""Decision thresholds calibrated on held-out normal images, at a target false-alarm rate.

Image level: per-image scores of normal images rarely number more than a few dozen, so the 99th percentile is
poorly estimated by the sample itself. Extreme-value theory (peaks over threshold): exceedances of the scores
over a high threshold ``u`` follow a generalised Pareto distribution; fitted by maximum likelihood
(scipy ``genpareto``), it gives the score exceeded with probability ``far``. The empirical threshold
(:func:`~automl_ad.evaluation.metrics.threshold_at_far`, split-conformal: exceeded by a new normal image with
probability at most ``far`` where the sample allows it) is reported beside it, and the fit is rejected in its
favour when it is not trustworthy (too few exceedances or a fit that contradicts the data). Pixel level: normal
images yield many pixels, so the empirical quantile is used. With labelled defects, the F1-optimal image
threshold is reported too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from automl_ad.defaults import DEFAULT_FALSE_ALARM_RATE
from automl_ad.evaluation.metrics import rates_at, smallest_far, threshold_at_far

#: Share of the normal scores used as the tail for the generalised Pareto fit, and the fewest exceedances.
TAIL_FRACTION = 0.3
MIN_EXCEEDANCES = 8


@dataclass
class Threshold:
    """A calibrated threshold and how it was obtained."""

    value: float
    method: str  # "evt" (generalised Pareto tail), "empirical" or "f1_optimal"
    target_false_alarm_rate: float | None
    empirical: float | None = None  # empirical quantile at the target rate, for comparison
    evt: float | None = None
    n_normal: int = 0
    note: str = ""
    #: Of the ``n_normal`` scores, those of training images scored out of fold (:mod:`automl_ad.deploy.out_of_fold`)
    n_out_of_fold: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_image_threshold(normal_scores, far: float = DEFAULT_FALSE_ALARM_RATE) -> Threshold:
    """Threshold on image scores such that about ``far`` of normal images exceed it."""
    from scipy.stats import genpareto

    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if len(scores) < 2 or not np.isfinite(scores).all():
        raise ValueError("calibration needs at least two finite normal scores")
    if not 0 < far < 1:
        raise ValueError(f"the false-alarm rate must lie in (0, 1), got {far}")
    empirical = threshold_at_far(scores, far)
    k = max(MIN_EXCEEDANCES, int(round(len(scores) * TAIL_FRACTION)))
    if len(scores) <= k + 1:
        return Threshold(empirical, "empirical", far, empirical, None, len(scores),
                         f"only {len(scores)} normal scores: too few for a tail fit")
    u = scores[-k - 1]
    exceedances = scores[-k:] - u
    shape, _, scale = genpareto.fit(exceedances, floc=0.0)
    tail_probability = k / len(scores)
    if far >= tail_probability:
        return Threshold(empirical, "empirical", far, empirical, None, len(scores), "target inside the sample body")
    evt = float(u + genpareto.ppf(1 - far / tail_probability, shape, loc=0.0, scale=scale))
    # an infinite-mean tail (shape > 1), an extrapolation far beyond the observed spread, or one below the highest
    # score for a target beyond the sample's resolution (it would flag more than the target of these very images)
    # is not trusted
    if not np.isfinite(evt) or shape > 1.0 or evt > scores[-1] + 10 * (scores[-1] - u) or \
            (far < smallest_far(len(scores)) and evt < scores[-1]):
        return Threshold(empirical, "empirical", far, empirical, evt, len(scores),
                         f"tail fit rejected (shape {shape:.2f}, estimate {evt:.4g})")
    return Threshold(evt, "evt", far, empirical, evt, len(scores), f"generalised Pareto shape {shape:.2f}, "
                     f"scale {scale:.3g} over the top {k} scores")


def calibrate_pixel_threshold(normal_maps, far: float = DEFAULT_FALSE_ALARM_RATE) -> Threshold:
    """Threshold on map values such that about ``far`` of pixels of normal images exceed it."""
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in normal_maps])
    value = float(np.quantile(values, 1 - far))
    return Threshold(value, "empirical", far, value, None, len(normal_maps), f"{values.size} normal pixels")


def f1_optimal_threshold(labels, scores) -> Threshold:
    """The image threshold maximising F1 on labelled images (needs both classes)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return Threshold(float(thresholds[best]), "f1_optimal", None, None, None, int((np.asarray(labels) == 0).sum()),
                     f"F1 {f1[best]:.3f} on {len(labels)} labelled images")


#: False-alarm rates at which the operating-point table states the threshold and detection rate.
OPERATING_FALSE_ALARM_RATES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def operating_points(normal_scores, defect_scores=None, rates=OPERATING_FALSE_ALARM_RATES) -> list[dict]:
    """Threshold → (false-alarm rate, detection rate) on labelled scores: for each target rate, the empirical
    threshold of the normal scores and the share of defects above it (None without defects)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    defects = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    labels, scores = np.r_[np.zeros(len(normal), int), np.ones(len(defects), int)], np.r_[normal, defects]
    table = []
    for rate in rates:
        value = threshold_at_far(normal, rate)
        table.append({"target_false_alarm_rate": rate, "threshold": value, **rates_at(value, labels, scores)})
    return table
