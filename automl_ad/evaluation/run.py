"""Evaluate a fitted detector the same way for every family: metrics on a labelled set plus cost figures."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.evaluation.cost import CostReport, PeakRss, directory_size_mb, measure_latency, measure_throughput
from automl_ad.evaluation.metrics import evaluate

#: Cost measurement settings shared by every family.
LATENCY_IMAGES = 10
LATENCY_REPEATS = 30
LATENCY_WARMUP = 5
THROUGHPUT_BATCH = 8


@dataclass
class EvaluationResult:
    """Metrics (None = unavailable for this data), costs, and the raw scores they came from."""

    metrics: dict
    cost: CostReport
    image_scores: np.ndarray
    anomaly_maps: np.ndarray | None
    score_seconds: float

    def summary(self) -> dict:
        return {"metrics": self.metrics, "cost": self.cost.to_dict(), "score_seconds": self.score_seconds}


def latency_sample(images: ImageSet) -> ImageSet:
    """The first ``LATENCY_IMAGES`` of ``images``, decoded at their stored size (so that resizing counts in a
    latency measured on them)."""
    return ImageSet.from_arrays(list(images.subset(range(min(len(images), LATENCY_IMAGES))).load_each()))


def measure_costs(detector, images, batch_size: int = THROUGHPUT_BATCH, repeats: int = LATENCY_REPEATS) -> CostReport:
    """Latency at batch 1 (after warm-up; decoded images at their stored size, so resizing and map
    post-processing count), throughput at ``batch_size``, peak RSS while scoring, and saved model size."""
    decoded = latency_sample(images)
    singles = [decoded.subset([i]) for i in range(len(decoded))]
    p50, p95 = measure_latency(detector.score_samples, singles, warmup=LATENCY_WARMUP, repeats=repeats)
    batch = decoded.subset([i % len(decoded) for i in range(batch_size)])
    with PeakRss() as memory:
        throughput = measure_throughput(detector.score_samples, batch, repeats=3)
    with tempfile.TemporaryDirectory() as tmp:
        model_mb = directory_size_mb(detector.save(tmp))
    return CostReport(fit_seconds=detector.fit_seconds_, latency_ms_p50=p50, latency_ms_p95=p95,
                      throughput_ips=throughput, batch_size=batch_size,
                      peak_rss_mb_fit=detector.fit_peak_rss_mb_,
                      peak_rss_mb_score=memory.peak_mb, model_mb=model_mb)


def evaluate_detector(detector, test, measure_cost: bool = True) -> EvaluationResult:
    """Score ``test`` (an ImageSet with labels and masks), compute every metric, and measure costs."""
    start = time.perf_counter()
    scores = detector.score_samples(test)
    seconds = time.perf_counter() - start
    metrics = evaluate(test.labels, scores.image_scores, scores.anomaly_maps, test.masks())
    cost = measure_costs(detector, test) if measure_cost else CostReport(
        fit_seconds=detector.fit_seconds_, peak_rss_mb_fit=detector.fit_peak_rss_mb_)
    return EvaluationResult(metrics, cost, scores.image_scores, scores.anomaly_maps, seconds)

