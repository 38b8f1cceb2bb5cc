"""Evaluation: anomaly-detection metrics (unavailable ones are None) and cost measurement."""

from automl_ad.evaluation.cost import (
    CostReport,
    PeakRss,
    directory_size_mb,
    measure_latency,
    measure_throughput,
)
from automl_ad.evaluation.metrics import (
    METRIC_NAMES,
    aupro,
    detection_at_far,
    evaluate,
    format_metrics,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    rates_at,
    smallest_far,
    threshold_at_far,
)

__all__ = [
    "METRIC_NAMES",
    "CostReport",
    "PeakRss",
    "aupro",
    "detection_at_far",
    "directory_size_mb",
    "evaluate",
    "format_metrics",
    "image_auroc",
    "image_f1_max",
    "measure_latency",
    "measure_throughput",
    "pixel_ap",
    "pixel_auroc",
    "rates_at",
    "smallest_far",
    "threshold_at_far",
]
