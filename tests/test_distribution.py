"""Family-specific behaviour of the distribution-map route: PaDiM and FastFlow on toy features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import create_detector
from automl_ad.detectors.graph_based import GraphDetector

TOY = {"backbone": "resnet18", "pretrained": False, "cache_features": False}


def _with_features(detector, features):
    """Bypass the backbone: ``_features`` returns ``features`` (a list of (N, C, h, w) arrays) for any images, and
    scoring runs the head on them (as for images read through the feature cache), not the whole graph."""
    detector._features = lambda images: [f[:len(images)] for f in features]
    detector._score = lambda images: GraphDetector._score(detector, images)
    return detector


def _images(count: int, side: int = 8) -> ImageSet:
    """Blank images; ``score_samples`` returns maps at their size (``side``)."""
    return ImageSet.from_arrays([np.zeros((side, side), np.float32)] * count)


def test_padim_mahalanobis_matches_numpy():
    rng = np.random.default_rng(0)
    fine = rng.normal(size=(12, 3, 4, 4)).astype(np.float32)
    coarse = rng.normal(size=(12, 2, 2, 2)).astype(np.float32)
    detector = _with_features(create_detector("padim", **TOY, input_size=4, n_features=4, epsilon=0.01,
                                              smoothing_sigma=0.0), [fine, coarse]).fit(_images(10))
    # position (1, 2) of the fine grid lies in coarse cell (0, 1); embedding = chosen channels of both stages
    embed = lambda i: np.concatenate([fine[i, :, 1, 2], coarse[i, :, 0, 1]])[detector.channels_]  # noqa: E731
    train = np.stack([embed(i) for i in range(10)])
    covariance = np.cov(train, rowvar=False) + 0.01 * np.eye(4)
    np.testing.assert_allclose(detector.mean_[1 * 4 + 2], train.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(detector.inv_covariance_[1 * 4 + 2], np.linalg.inv(covariance), rtol=1e-4, atol=1e-4)
    # smoothing off, grid = input size = image size: maps are the distances
    maps = detector.score_samples(_images(12, side=4)).anomaly_maps
    for i in (10, 11):
        delta = embed(i) - train.mean(axis=0)
        assert maps[i, 1, 2] == pytest.approx(np.sqrt(delta @ np.linalg.inv(covariance) @ delta), rel=1e-4)


def test_padim_clips_n_features_to_available_channels():
    features = [np.random.default_rng(1).normal(size=(5, 3, 2, 2)).astype(np.float32)]
    detector = _with_features(create_detector("padim", **TOY, input_size=2, n_features=100), features)
    detector.fit(_images(5))
    assert detector.channels_.tolist() == [0, 1, 2] and detector.inv_covariance_.shape == (4, 3, 3)


@pytest.mark.parametrize(("channels", "kept"), [((32, 96), 64), ((128, 256), 100), ((3,), 1)])
def test_padim_keeps_the_papers_100_channels_but_at_most_half_by_default(channels, kept):
    """MobileNetV2 at strides 8 and 16 (32 + 96 channels): 64; ResNet18's 128 + 256: the paper's 100."""
    rng = np.random.default_rng(2)
    features = [rng.normal(size=(5, c, 2, 2)).astype(np.float32) for c in channels]
    detector = _with_features(create_detector("padim", **TOY, input_size=2), features).fit(_images(5))
    assert detector.n_features is None and len(detector.channels_) == kept
    assert detector.inv_covariance_.shape == (4, kept, kept)
    assert len(detector.set_params(n_features=7).fit(_images(5)).channels_) == min(7, sum(channels))


def _toy_flow_features(count: int = 16) -> list[np.ndarray]:
    """Two stages whose channels are noisy copies of one latent map (a flow can learn much of that structure)."""
    rng = np.random.default_rng(0)
    stages = []
    for channels, size in ((4, 8), (6, 4)):
        latent = rng.normal(size=(count, 1, size, size))
        noise = 0.05 * rng.normal(size=(count, channels, size, size))
        stages.append((latent * rng.normal(size=(1, channels, 1, 1)) + noise).astype(np.float32))
    return stages


def test_fastflow_nll_decreases_and_is_reproducible():
    params = dict(**TOY, input_size=32, flow_steps=2, epochs=8, batch_size=8, learning_rate=1e-2, seed=3)
    first = _with_features(create_detector("fastflow", **params), _toy_flow_features()).fit(_images(16))
    assert np.all(np.diff(first.loss_history_) < 0) and first.loss_history_[-1] < first.loss_history_[0] - 0.5
    second = _with_features(create_detector("fastflow", **params), _toy_flow_features()).fit(_images(16))
    assert first.loss_history_ == second.loss_history_
    maps = first.score_samples(_images(4, side=32)).anomaly_maps
    assert maps.shape == (4, 32, 32) and 0 <= maps.min() and maps.max() <= 1


@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_fastflow_inference_steps_equal_freia_blocks(conv3x3_only):
    """The head's folded coupling steps give FrEIA's outputs (all channels, in order) for trained-looking weights:
    global scale and offset away from their initial values, the subnets' last convolutions no longer zero."""
    import torch

    from automl_ad.detectors.fastflow.detector import _model
    from automl_ad.detectors.fastflow.graph import CouplingStep, inference_flow

    torch.manual_seed(0)
    shapes = [(6, 8, 8), (9, 4, 4)]  # an odd channel count: unequal halves
    model = _model(shapes, 4, 1.0, conv3x3_only, 2.0, True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "w_perm" not in name:  # the permutations stay permutations
                parameter.add_(0.2 * torch.randn_like(parameter))
        for shape, flow in zip(shapes, model["flows"]):
            x = torch.randn(3, *shape)
            z, _ = flow(x)
            steps = torch.nn.Sequential(*(CouplingStep(block) for block in flow.module_list))
            assert torch.allclose(steps(x), z, atol=1e-5)
            # the last block unpermuted: the same values per position, which is all the head averages
            assert torch.allclose(inference_flow(flow)(x).pow(2).mean(dim=1), z.pow(2).mean(dim=1), atol=1e-5)


def test_fastflow_on_epoch_true_stops_training():
    seen = []
    detector = _with_features(create_detector("fastflow", **TOY, input_size=32, flow_steps=2, epochs=50,
                                              batch_size=8), _toy_flow_features())
    detector.fit(_images(16), on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["loss"])) or epoch == 2)
    assert [epoch for epoch, _ in seen] == [0, 1, 2] and detector.epochs_trained_ == 3
    assert all(np.isfinite(loss) for _, loss in seen)


@pytest.mark.parametrize("family, params, match", [
    ("padim", {"n_features": 0}, "n_features"),
    ("padim", {"n_features": 2.5}, "n_features"),
    ("padim", {"epsilon": 0.0}, "epsilon"),
    ("padim", {"smoothing_sigma": -1}, "smoothing_sigma"),
    ("fastflow", {"flow_steps": 0}, "flow_steps"),
    ("fastflow", {"epochs": -3}, "epochs"),
    ("fastflow", {"batch_size": 0}, "batch_size"),
    ("fastflow", {"hidden_ratio": 0}, "hidden_ratio"),
    ("fastflow", {"learning_rate": -1e-3}, "learning_rate"),
    ("fastflow", {"affine_clamping": 0}, "affine_clamping"),
    ("fastflow", {"weight_decay": -1}, "weight_decay"),
])
def test_bad_parameters_raise(family, params, match):
    detector = _with_features(create_detector(family, **TOY, input_size=32, **params), _toy_flow_features())
    with pytest.raises(ValueError, match=match):
        detector.fit(_images(4))


def test_padim_streamed_moments_equal_the_two_pass_formula(monkeypatch):
    """PaDiM accumulates mean and covariance over image chunks; the result is the plain two-pass estimate."""
    from automl_ad.detectors.padim import detector as padim_module

    rng = np.random.default_rng(0)
    features = [rng.normal(3, 1, (50, 16, 8, 8)).astype(np.float32),
                rng.normal(0, 2, (50, 32, 4, 4)).astype(np.float32)]
    detector = create_detector("padim", backbone="resnet18", pretrained=False, input_size=64)
    detector.channels_ = np.sort(rng.choice(48, 20, replace=False))
    monkeypatch.setattr(padim_module, "_CHUNK_VALUES", 64 * 20 * 7)  # 7 images per chunk
    mean, covariance = padim_module._streamed_moments(detector, features)
    embedding = detector._embed(features).double()
    centred = (embedding - embedding.mean(dim=0)).transpose(0, 1)
    np.testing.assert_allclose(mean.numpy(), embedding.mean(dim=0).numpy(), atol=1e-10)
    np.testing.assert_allclose(covariance.numpy(), (centred.transpose(1, 2) @ centred / 49).numpy(), atol=1e-10)


def test_padim_fits_after_set_num_threads():
    """Search trials call ``torch.set_num_threads``; torch 2.14's batched LU inverse then failed on CPU ("Pivots
    given to lu_solve ...", a magnetic_tile trial). The fit runs in a fresh process, as a trial does."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numpy as np, torch
        torch.set_num_threads(2)
        from tests.test_distribution import TOY, _images, _with_features
        from automl_ad.detectors import create_detector
        features = [np.random.default_rng(0).normal(size=(40, 160, 8, 8)).astype(np.float32)]
        detector = _with_features(create_detector("padim", **TOY, input_size=8, n_features=152), features)
        detector.fit(_images(40))
        embedding = features[0][:, detector.channels_, 0, 0].astype(np.float64)
        expected = np.linalg.inv(np.cov(embedding, rowvar=False) + 0.01 * np.eye(152))
        assert np.allclose(detector.inv_covariance_[0], expected, rtol=1e-3, atol=1e-4)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]


def test_padim_names_the_position_whose_covariance_cannot_be_inverted():
    features = [np.random.default_rng(2).normal(size=(6, 3, 2, 2)).astype(np.float32)]
    features[0][:, :, 1, 0] = np.nan
    detector = _with_features(create_detector("padim", **TOY, input_size=2, n_features=3), features)
    with pytest.raises(ValueError, match="grid position 2 is not positive definite.*raise epsilon"):
        detector.fit(_images(6))
