"""Metrics (hand-computed AUPRO, sklearn agreement, unavailable metrics) and cost measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from automl_ad.evaluation import (
    METRIC_NAMES,
    CostReport,
    PeakRss,
    aupro,
    directory_size_mb,
    evaluate,
    format_metrics,
    image_auroc,
    image_f1_max,
    measure_latency,
    measure_throughput,
    pixel_ap,
    pixel_auroc,
)


def hand_case():
    """Image 0 (3x3, anomalous) has region A = {(0,0)} and region B = {(1,2),(2,2)}, not 8-connected;
    image 1 (1x2, normal, no mask) has only normal pixels, so there are 8 normal pixels in all."""
    map_0 = np.array([[0.9, 0.7, 0.2], [0.1, 0.1, 0.8], [0.0, 0.5, 0.5]])
    mask_0 = np.array([[255, 0, 0], [0, 0, 255], [0, 0, 255]], dtype=np.uint8)
    map_1 = np.array([[0.6, 0.4]])
    return [map_0, map_1], [mask_0, None], [1, 0]


def test_aupro_hand_computed():
    # Thresholds, descending (PRO = mean of overlap(A), overlap(B); FPR = normal pixels >= t / 8):
    #   t=0.9: A=1, B=0    -> PRO 0.5,  FPR 0
    #   t=0.8: B=1/2       -> PRO 0.75, FPR 0
    #   t=0.7: normal 0.7  -> PRO 0.75, FPR 1/8
    #   t=0.6: normal 0.6  -> PRO 0.75, FPR 2/8
    #   t=0.5: B=1 and normal 0.5 tie -> PRO 1, FPR 3/8 (diagonal segment)
    #   t=0.4, 0.2, 0.1 (two pixels), 0.0 -> FPR 4/8, 5/8, 7/8, 1 at PRO 1
    # Curve: (0,0) (0,.5) (0,.75) (.125,.75) (.25,.75) (.375,1) (.5,1) (.625,1) (.875,1) (1,1).
    # Up to 0.3: at FPR .3 the diagonal gives PRO .75 + .4 * .25 = .85;
    #   area = .25 * .75 + .05 * (.75 + .85) / 2 = .1875 + .04 = .2275 -> /.3 = 91/120.
    # Up to 0.25: area .1875 -> /.25 = .75. Up to 1: .1875 + .125 * 1.75 / 2 + .625 = .921875.
    maps, masks, labels = hand_case()
    assert aupro(maps, masks, labels) == pytest.approx(91 / 120, abs=1e-12)
    assert aupro(maps, masks, labels, fpr_limit=0.25) == pytest.approx(0.75, abs=1e-12)
    assert aupro(maps, masks, labels, fpr_limit=1.0) == pytest.approx(0.921875, abs=1e-12)


def test_aupro_rejects_bad_limit():
    maps, masks, labels = hand_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, labels, fpr_limit=0)


def blob_data(seed: int = 0, n: int = 12, size: int = 32):
    """Half normal, half anomalous images with one or two rectangular defects each."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    masks = []
    for label in labels:
        mask = np.zeros((size, size), np.uint8)
        for _ in range(label * int(rng.integers(1, 3))):
            y, x = rng.integers(0, size - 8, 2)
            mask[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = 255
        masks.append(mask)
    return labels, masks, rng


def test_perfect_and_inverted_detectors():
    labels, masks, rng = blob_data()
    good_maps = [(m > 0) + 0.5 * rng.random(m.shape) for m in masks]
    good_scores = labels + 0.5 * rng.random(labels.size)
    perfect = evaluate(labels, good_scores, good_maps, masks)
    assert perfect == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0))
    inverted = evaluate(labels, -good_scores, [-m for m in good_maps], masks)
    assert inverted["image_auroc"] == pytest.approx(0.0)
    assert inverted["pixel_auroc"] == pytest.approx(0.0)
    assert inverted["aupro"] == pytest.approx(0.0)


def test_random_maps_give_chance_aupro():
    labels, masks, rng = blob_data(seed=1, n=40, size=64)
    maps = [rng.random(m.shape) for m in masks]
    assert aupro(maps, masks, labels) == pytest.approx(0.15, abs=0.02)  # PRO ~ FPR: area 0.3**2/2, / 0.3
    assert pixel_auroc(maps, masks, labels) == pytest.approx(0.5, abs=0.02)


def test_pixel_metrics_match_sklearn_and_accept_a_stacked_array():
    labels, masks, rng = blob_data(seed=2)
    maps = np.stack([(m > 0) * 0.3 + rng.random(m.shape) for m in masks])
    truth = np.concatenate([m.ravel() > 0 for m in masks])
    assert pixel_auroc(maps, masks, labels) == pytest.approx(roc_auc_score(truth, maps.ravel()), abs=1e-12)
    assert pixel_ap(maps, masks, labels) == pytest.approx(average_precision_score(truth, maps.ravel()), abs=1e-12)
    assert aupro(maps, masks, labels) == pytest.approx(aupro(list(maps), masks, labels), abs=1e-12)
    tied = np.round(maps * 8) / 8  # many pixels share each score: every run of ties is one threshold
    assert pixel_auroc(tied, masks, labels) == pytest.approx(roc_auc_score(truth, tied.ravel()), abs=1e-12)
    assert pixel_ap(tied, masks, labels) == pytest.approx(average_precision_score(truth, tied.ravel()), abs=1e-12)


def test_maps_of_different_sizes_and_masks_resized_nearest_neighbour():
    rng = np.random.default_rng(3)
    small = np.zeros((4, 5), np.uint8)
    small[1:3, 2:4] = 255
    coarse = np.zeros((6, 4), bool)
    coarse[2:4, 1] = True
    maps = [rng.random((8, 10)), rng.random((6, 4)), rng.random((3, 7))]
    # mask 0 upsampled 2x, mask 1 downsampled from 2x2 blocks, image 2 normal without a mask
    masks = [small, np.repeat(np.repeat(coarse, 2, 0), 2, 1), None]
    labels = [1, 1, 0]
    expected = [np.repeat(np.repeat(small > 0, 2, 0), 2, 1), coarse, np.zeros((3, 7), bool)]
    truth = np.concatenate([m.ravel() for m in expected])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(maps, masks, labels) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert aupro(maps, masks, labels) == pytest.approx(aupro(maps, expected, labels), abs=1e-12)


def test_empty_mask_adds_normal_pixels_but_no_region():
    maps, masks, labels = hand_case()
    extra = np.array([[0.95, 0.05], [0.05, 0.05]])
    as_anomalous = aupro(maps + [extra], masks + [np.zeros((2, 2))], labels + [1])
    as_normal = aupro(maps + [extra], masks + [None], labels + [0])
    assert as_anomalous == pytest.approx(as_normal, abs=1e-12)
    assert as_anomalous < aupro(maps, masks, labels)  # the 0.95 false positive costs area
    only_empty = evaluate([0, 1], [0.1, 0.9], [extra, extra], [None, np.zeros((2, 2))])
    assert only_empty["pixel_auroc"] is None and only_empty["pixel_ap"] is None and only_empty["aupro"] is None


def test_anomalous_image_without_mask_is_left_out_of_pixel_metrics():
    maps, masks, labels = hand_case()
    with_unmasked = evaluate(labels + [1], [0.9, 0.5, 0.2], maps + [np.full((5, 5), 0.99)], masks + [None])
    without = evaluate(labels, [0.9, 0.1], maps, masks)
    for name in ("pixel_auroc", "pixel_ap", "aupro"):
        assert with_unmasked[name] == pytest.approx(without[name], abs=1e-12)
    assert with_unmasked["image_auroc"] == pytest.approx(0.5)  # the image itself still counts


def test_unavailable_metrics_are_none():
    maps = [np.random.default_rng(4).random((4, 4)) for _ in range(3)]
    no_anomalies = evaluate([0, 0, 0], [0.1, 0.2, 0.3], maps, [None] * 3)
    assert no_anomalies == dict.fromkeys(METRIC_NAMES)
    assert format_metrics(no_anomalies) == dict.fromkeys(METRIC_NAMES, "n/a")
    image_only = evaluate([0, 1, 1], [0.1, 0.2, 0.3])
    assert image_only["image_auroc"] == 1.0 and image_only["pixel_auroc"] is None
    no_masks = evaluate([0, 1, 1], [0.1, 0.2, 0.3], maps, [None] * 3)
    assert no_masks["pixel_ap"] is None and no_masks["aupro"] is None
    assert format_metrics({"image_auroc": 0.98765, "aupro": None}, digits=3) == {"image_auroc": "0.988", "aupro": "n/a"}


def test_image_f1_max_hand_computed():
    # t=.9: P 1, R .5 -> .667; t=.6: P .5, R .5 -> .5; t=.4: P 2/3, R 1 -> .8; t=.1: P .5, R 1 -> .667
    assert image_f1_max([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == pytest.approx(0.8)
    assert image_auroc([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == pytest.approx(0.75)


def test_invalid_inputs_raise():
    maps, masks, labels = hand_case()
    with pytest.raises(ValueError, match="NaN or inf in image_scores"):
        evaluate(labels, [0.5, np.nan])
    with pytest.raises(ValueError, match="NaN or inf in anomaly map 1"):
        aupro([maps[0], np.array([[np.inf, 0.0]])], masks, labels)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one each"):
        pixel_auroc(maps, masks[:1], labels)
    with pytest.raises(ValueError, match="2-D"):
        pixel_auroc([maps[0], np.zeros((1, 2, 3))], masks, labels)


def _clear_refs_writable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(
            "vmhwm", marks=pytest.mark.skipif(not _clear_refs_writable(), reason="cannot reset VmHWM here")
        ),
        pytest.param("sampling", marks=pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="no /proc")),
    ],
)
def test_peak_rss_sees_a_200_mb_allocation(method):
    with PeakRss(method) as idle:
        pass
    with PeakRss(method) as busy:
        block = np.ones(200 * 2**20 // 8)
    del block
    assert idle.method == busy.method == method
    assert busy.peak_mb >= busy.start_mb > 0
    assert busy.increase_mb - idle.increase_mb == pytest.approx(200, abs=40)


def test_latency_and_throughput_are_sane():
    calls = []

    def score(x):
        calls.append(len(x))
        return np.sort(x)

    inputs = [np.random.default_rng(i).random(1000) for i in range(3)]
    p50, p95 = measure_latency(score, inputs, warmup=2, repeats=10)
    assert 0 < p50 <= p95
    assert len(calls) == 12
    assert measure_throughput(score, np.zeros((8, 1000)), repeats=3) > 0
    assert calls[-1] == 8
    with pytest.raises(ValueError):
        measure_latency(score, [])


def test_directory_size_and_cost_report(tmp_path):
    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 2**20)
    (tmp_path / "model" / "sub" / "index.bin").write_bytes(b"\0" * 2**19)
    assert directory_size_mb(tmp_path / "model") == pytest.approx(1.5)
    assert directory_size_mb(tmp_path / "model" / "weights.bin") == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError):
        directory_size_mb(tmp_path / "missing")
    report = CostReport(fit_seconds=1.5, latency_ms_p50=2.0, batch_size=8, model_mb=1.5)
    assert report.to_dict() == {
        "fit_seconds": 1.5,
        "latency_ms_p50": 2.0,
        "latency_ms_p95": None,
        "throughput_ips": None,
        "batch_size": 8,
        "peak_rss_mb_fit": None,
        "peak_rss_mb_score": None,
        "model_mb": 1.5,
    }
