"""Deep SVDD, CutPaste and SimpleNet specifics: the parts of each paper that make the method what it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import create_detector
from automl_ad.detectors.cutpaste.detector import (
    cut_paste,
    patch_origins,
    receptive_field_maps,
    scar,
)
from automl_ad.detectors.deep_svdd.detector import initial_centre, svdd_network
from automl_ad.detectors.simplenet.detector import truncated_l1_loss

# Random resnet18 at 32 px: no weights needed and a fit takes about a second.
TINY = {"backbone": "resnet18", "pretrained": False, "input_size": 32}


@pytest.fixture(scope="module")
def images() -> ImageSet:
    rng = np.random.default_rng(0)
    base = rng.random((32, 32, 3), dtype=np.float32)
    return ImageSet.from_arrays([np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)
                                 for _ in range(8)])


def _stop_after(n: int, seen: list):
    def callback(epoch, metrics):
        seen.append((epoch, metrics["loss"]))
        return epoch + 1 >= n
    return callback


# --- Deep SVDD ------------------------------------------------------------------------------------------------
SVDD = {**TINY, "cache_features": False, "batch_size": 16, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def svdd(images):
    seen = []
    detector = create_detector("deep_svdd", **SVDD, epochs=6).fit(images, on_epoch=_stop_after(99, seen))
    return detector, seen


def test_svdd_network_has_no_bias_no_affine_norm_and_unbounded_activations():
    network = svdd_network(24, (16, 8), 4)
    names = [name for name, _ in network.named_parameters()]
    assert names and not [n for n in names if "bias" in n]
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and not any(m.affine for m in norms)
    assert not any(isinstance(m, (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.ReLU6)) for m in network.modules())
    assert sum(isinstance(m, nn.LeakyReLU) for m in network.modules()) == 2


def test_svdd_centre_is_the_initial_mean_with_no_near_zero_coordinate():
    torch.manual_seed(0)
    network = svdd_network(6, (12,), 32).eval()
    patches = torch.randn(200, 6)
    with torch.no_grad():
        mean = network(patches).mean(dim=0)
    centre = initial_centre(network, patches, eps=0.1, batch_size=64)
    small = mean.abs() < 0.1
    assert small.any() and (~small).any()  # the test exercises both cases
    assert (centre.abs() >= 0.1 - 1e-7).all()
    torch.testing.assert_close(centre[~small], mean[~small])
    assert (torch.sign(centre[small]) == torch.where(mean[small] < 0, -1.0, 1.0)).all()


def test_svdd_fit_pulls_patches_towards_the_centre(svdd):
    detector, seen = svdd
    assert [e for e, _ in seen] == list(range(6)) and detector.epochs_trained_ == 6
    assert detector.loss_history_[-1] < 0.7 * detector.loss_history_[0]
    assert (detector.centre_.abs() >= detector.centre_eps - 1e-7).all()


def test_svdd_scores_are_the_maps_maximum(svdd, images):
    scores = svdd[0].score_samples(images)
    assert scores.anomaly_maps.shape == (8, 32, 32) and (scores.anomaly_maps >= 0).all()
    np.testing.assert_allclose(scores.image_scores, scores.anomaly_maps.max(axis=(1, 2)))


def test_svdd_soft_boundary_sets_the_radius_and_stops_early(images):
    seen = []
    detector = create_detector("deep_svdd", **SVDD, epochs=10, objective="soft-boundary", nu=0.2,
                               warm_up_epochs=1).fit(images, on_epoch=_stop_after(3, seen))
    assert [e for e, _ in seen] == [0, 1, 2] and detector.epochs_trained_ == 3
    assert detector.radius_ > 0
    grids, _ = detector._patch_grids(images)
    scores = detector.patch_scores(grids.reshape(-1, grids.shape[-1]))  # the distance to the centre minus R^2
    assert float((scores > 0).float().mean()) == pytest.approx(0.2, abs=0.02)
    maps = detector.score_samples(images).anomaly_maps  # distance minus R^2: inliers below zero
    assert maps.min() < 0 < maps.max()


@pytest.mark.parametrize("params, match", [
    ({"epochs": 0}, "epochs"), ({"hidden_dims": (16, 0)}, "hidden_dims"), ({"objective": "hard"}, "objective"),
    ({"nu": 0}, "nu"), ({"centre_eps": 0}, "centre_eps"), ({"learning_rate": 0}, "learning_rate"),
    ({"warm_up_epochs": -1}, "warm_up_epochs"),
])
def test_svdd_bad_parameters_raise(images, params, match):
    with pytest.raises(ValueError, match=match):
        create_detector("deep_svdd", **{**SVDD, "epochs": 1, **params}).fit(images)


# --- CutPaste -------------------------------------------------------------------------------------------------
def _changed(a: np.ndarray, b: np.ndarray):
    ys, xs = np.nonzero((a != b).any(axis=2))
    return ys, xs


@pytest.mark.parametrize("seed", range(20))
def test_cut_paste_pastes_a_bounded_rectangle_of_the_image_itself(seed):
    rng = np.random.default_rng(seed)
    image = rng.random((64, 64, 3)).astype(np.float32)
    out = cut_paste(image, np.random.default_rng(seed), area_ratio=(0.02, 0.15), aspect_ratio=0.3, jitter=0.0)
    assert out.shape == image.shape and out.dtype == image.dtype
    ys, xs = _changed(image, out)
    assert len(ys) > 0
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    assert (bottom - top) * (right - left) <= 0.15 * 64 * 64 + 64  # rounding of the sides
    # without jitter the pasted rectangle is a copy of another rectangle of the same image
    h, w = bottom - top, right - left
    pasted = out[top:bottom, left:right]
    assert any(np.array_equal(pasted, image[y:y + h, x:x + w]) for y in range(65 - h) for x in range(65 - w))


@pytest.mark.parametrize("seed", range(20))
def test_scar_changes_only_a_thin_rotated_rectangle(seed):
    rng = np.random.default_rng(seed)
    image = rng.random((64, 64, 3)).astype(np.float32)
    out = scar(image, np.random.default_rng(seed), width=(2, 6), length=(10, 25), rotation=45.0, jitter=0.1)
    assert out.shape == image.shape and out.dtype == image.dtype
    ys, xs = _changed(image, out)
    assert 0 < len(ys) <= 6 * 25 + 2 * (6 + 25)  # the rectangle's area plus nearest-neighbour rotation edges
    assert math.hypot(ys.max() - ys.min(), xs.max() - xs.min()) <= math.hypot(6, 25) + 2
    assert (out >= 0).all() and (out <= 1).all()


def test_patch_grid_reaches_the_edges_and_maps_average_covering_patches():
    origins = patch_origins(40, 16, 10)
    assert {tuple(o) for o in origins} >= {(0, 0), (24, 24), (0, 24), (24, 0)}
    flat = receptive_field_maps(np.full((1, len(origins)), 3.0), origins, 40, 16)
    np.testing.assert_allclose(flat, 3.0)
    scores = np.zeros((1, len(origins)))
    hot = int(np.flatnonzero((origins == (10, 10)).all(axis=1))[0])
    scores[0, hot] = 1.0
    heat = receptive_field_maps(scores, origins, 40, 16)[0]
    assert heat[10:26, 10:26].min() > 0 and heat[:10].max() == 0 and heat[26:].max() == 0


CUTPASTE = {**TINY, "patch_size": 16, "patch_stride": 8, "batch_size": 4, "head_dims": (32, 16),
            "learning_rate": 0.01}


def test_cutpaste_fine_tunes_a_copy_with_frozen_batchnorm_statistics(images):
    detector = create_detector("cutpaste", **CUTPASTE, epochs=2)
    teacher = detector._extractor().model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    detector.fit(images, on_epoch=_stop_after(99, seen))
    assert [e for e, _ in seen] == [0, 1] and len(detector.loss_history_) == 2
    after = detector.network_.state_dict()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"the shared extractor's {key} changed"
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], before[k]) for k in stats)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("conv1.weight"))
    scores = detector.score_samples(images)
    assert scores.anomaly_maps.shape == (8, 32, 32)
    assert detector.mean_.shape == (detector._extractor().channels[-1],)
    assert detector.precision_.shape == (len(detector.mean_),) * 2


@pytest.mark.parametrize("params, match", [
    ({"patch_size": 64}, "patch_size"), ({"patch_stride": 0}, "patch_stride"), ({"head_dims": ()}, "head_dims"),
    ({"area_ratio": (0.2, 0.1)}, "area_ratio"), ({"aspect_ratio": 2}, "aspect_ratio"),
    ({"scar_width": (0, 4)}, "scar_width"), ({"momentum": 1}, "momentum"), ({"learning_rate": 0}, "learning_rate"),
])
def test_cutpaste_bad_parameters_raise(images, params, match):
    with pytest.raises(ValueError, match=match):
        create_detector("cutpaste", **{**CUTPASTE, "epochs": 1, **params}).fit(images)


# --- SimpleNet ------------------------------------------------------------------------------------------------
SIMPLENET = {**TINY, "cache_features": False, "batch_size": 2, "hidden_dim": 64, "learning_rate": 1e-3}


def test_truncated_l1_loss_is_zero_past_the_margin():
    scores = torch.tensor([0.7, 0.5, -0.6, -0.5])
    assert float(truncated_l1_loss(scores, 2, 0.5)) == 0.0
    scores = torch.tensor([0.0, 0.5, 0.5, -1.0])  # normal mean 0.25, anomalous mean 0.5
    assert float(truncated_l1_loss(scores, 2, 0.5)) == pytest.approx(0.25 + 0.5)


def test_simplenet_learns_to_score_noisy_features_higher(images):
    detector = create_detector("simplenet", **SIMPLENET, epochs=30, noise_std=1.0)
    features, _ = detector._patch_grids(images)
    seen = []
    detector.fit(images, on_epoch=_stop_after(99, seen))
    assert len(seen) == 30 and detector.loss_history_[-1] < 0.6 * detector.loss_history_[0]
    flat = features.reshape(-1, features.shape[-1])
    assert detector.feature_std_ == pytest.approx(float(flat.std(dim=0).pow(2).mean().sqrt()), rel=1e-3)
    generator = torch.Generator().manual_seed(1)
    noisy = flat + torch.randn(flat.shape, generator=generator) * detector.noise_std * detector.feature_std_
    normal_scores, noisy_scores = detector.patch_scores(flat), detector.patch_scores(noisy)
    assert float((noisy_scores > normal_scores).float().mean()) > 0.8
    scores = detector.score_samples(images)
    np.testing.assert_allclose(scores.image_scores, scores.anomaly_maps.max(axis=(1, 2)))


@pytest.mark.parametrize("params, match", [
    ({"noise_std": 0}, "noise_std"), ({"margin": -1}, "margin"), ({"hidden_dim": 0}, "hidden_dim"),
    ({"epochs": 1.5}, "epochs"), ({"smoothing_sigma": -1}, "smoothing_sigma"),
])
def test_simplenet_bad_parameters_raise(images, params, match):
    with pytest.raises(ValueError, match=match):
        create_detector("simplenet", **{**SIMPLENET, "epochs": 1, **params}).fit(images)
