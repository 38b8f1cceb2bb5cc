"""Generative families (autoencoder, GANomaly, diffusion): losses, reconstructions and scores on tiny images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import create_detector
from automl_ad.detectors.blocks import ssim_map
from automl_ad.detectors.diffusion.detector import alphas_bar, betas
from automl_ad.detectors.ganomaly import detector as ganomaly

SIZE = 32


def _disc(seed: int, size: int = SIZE) -> np.ndarray:
    """A bright disc with a dark bore on a dark background, slightly jittered, with sensor noise (RGB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] + 0.5 - size / 2 - rng.normal(0, 0.3, 2)[:, None, None]
    r = np.hypot(x, y)
    gray = 0.15 + 0.6 * np.clip(0.35 * size - r, 0, 1) * np.clip(r - 0.12 * size, 0, 1)
    colour = gray[..., None] * np.array([1.0, 0.9, 0.8])
    return np.clip(colour + rng.normal(0, 0.01, colour.shape), 0, 1).astype(np.float32)


def _defective(seed: int) -> np.ndarray:
    image = _disc(seed)
    image[6:11, 18:23] = [0.95, 0.2, 0.2]  # a red stain on the disc's rim
    return image


@pytest.fixture(scope="module")
def normals() -> ImageSet:
    return ImageSet.from_arrays([_disc(i) for i in range(16)])


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return ImageSet.from_arrays([_disc(100 + i) for i in range(4)] + [_defective(200 + i) for i in range(4)],
                                labels=[0] * 4 + [1] * 4)


# --- SSIM ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_scikit_image(channels):
    rng = np.random.default_rng(0)
    image = skdata.astronaut()[100:164, 180:244].astype(np.float64) / 255
    image = image[..., :channels] if channels == 3 else image.mean(axis=2, keepdims=True)
    distorted = np.clip(image + rng.normal(0, 0.08, image.shape), 0, 1)
    distorted[20:30, 20:40] *= 0.3
    mean, full = structural_similarity(image, distorted, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0, channel_axis=2, full=True)
    to_tensor = lambda a: torch.from_numpy(a.transpose(2, 0, 1)[None]).float()  # noqa: E731
    ours = ssim_map(to_tensor(distorted), to_tensor(image), same_size=False)[0].numpy()
    assert ours.shape == (channels, 64 - 10, 64 - 10)
    np.testing.assert_allclose(ours.mean(), mean, atol=1e-4)
    double = lambda a: torch.from_numpy(a.transpose(2, 0, 1)[None])  # noqa: E731
    exact = ssim_map(double(distorted), double(image), same_size=False)[0].numpy()
    np.testing.assert_allclose(exact.transpose(1, 2, 0), full[5:-5, 5:-5], atol=1e-9)  # skimage's map, border cut
    same = ssim_map(to_tensor(distorted), to_tensor(image))
    assert same.shape == (1, channels, 64, 64)
    assert torch.allclose(ssim_map(to_tensor(image), to_tensor(image)), torch.ones(1, channels, 64, 64), atol=1e-5)


# --- autoencoder --------------------------------------------------------------------------------------------------
AE = {"input_size": SIZE, "latent_dim": 16, "base_channels": 16, "batch_size": 4, "learning_rate": 1e-3,
      "loss": "mse", "map_metric": "l2", "smoothing_sigma": 1.0}


@pytest.fixture(scope="module")
def autoencoder(normals):
    epochs = []
    detector = create_detector("autoencoder", **AE, epochs=25).fit(normals, on_epoch=lambda e, m: epochs.append(e))
    return detector, epochs


def test_autoencoder_learns_normals_and_flags_the_defect(autoencoder, normals, test_set):
    detector, epochs = autoencoder
    assert epochs == list(range(25)) and detector.epochs_trained_ == 25
    assert detector.loss_history_[-1] < 0.2 * detector.loss_history_[0]
    inputs, outputs = detector.reconstruct(test_set)
    errors = ((inputs - outputs) ** 2).mean(axis=(1, 2, 3))
    assert errors[4:].min() > errors[:4].max()  # defective images reconstruct worse than unseen normals
    scores = detector.score_samples(test_set)
    assert scores.image_scores[4:].min() > scores.image_scores[:4].max()
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in scores.anomaly_maps[4:]]
    assert all(4 <= y <= 12 and 16 <= x <= 24 for y, x in peaks)  # the map peaks on the stain


def test_autoencoder_ssim_loss_map_and_top_k(normals, test_set):
    detector = create_detector("autoencoder", **{**AE, "loss": "mixed", "map_metric": "ssim",
                                                 "image_score": "top_k_mean", "top_k_fraction": 0.05},
                               epochs=2).fit(normals)
    scores = detector.score_samples(test_set)
    assert scores.anomaly_maps.shape == (8, SIZE, SIZE) and (scores.anomaly_maps >= -1e-6).all()
    top = np.sort(scores.anomaly_maps.reshape(8, -1), axis=1)[:, -round(0.05 * SIZE * SIZE):].mean(axis=1)
    np.testing.assert_allclose(scores.image_scores, top, rtol=1e-5)


def test_autoencoder_sizes_and_gray(normals):
    for size in (32, 64):
        detector = create_detector("autoencoder", **{**AE, "input_size": size, "gray": True}, epochs=1).fit(normals)
        inputs, outputs = detector.reconstruct(normals.subset([0]))
        assert inputs.shape == outputs.shape == (1, 1, size, size)


# --- GANomaly -----------------------------------------------------------------------------------------------------
GAN = {"input_size": SIZE, "latent_dim": 8, "base_channels": 16, "batch_size": 4}


def _residual(detector, images: ImageSet) -> float:
    inputs = torch.from_numpy(images.load(SIZE).transpose(0, 3, 1, 2)) * 2 - 1
    with torch.no_grad():
        outputs = detector.generator_(inputs)[0]
    return float((inputs - outputs).abs().mean())


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_ganomaly_networks_fit_the_input_size(size):
    generator = ganomaly.Generator(size, 3, 10, 8, 1)
    fake, latent_in, latent_out = generator(torch.zeros(2, 3, size, size))
    assert fake.shape == (2, 3, size, size) and latent_in.shape == latent_out.shape == (2, 10, 1, 1)
    probability, features = ganomaly.Discriminator(size, 3, 8, 0)(torch.zeros(2, 3, size, size))
    assert probability.shape == (2,) and features.shape[-2:] == (4, 4)


def test_ganomaly_losses_are_finite_and_reconstruction_improves(normals, test_set):
    short = create_detector("ganomaly", **GAN, epochs=1).fit(normals)
    trained = create_detector("ganomaly", **GAN, epochs=30).fit(normals)
    for parts in trained.loss_parts_:
        assert set(parts) == {"adv", "con", "enc", "generator", "discriminator"}
        assert all(np.isfinite(v) for v in parts.values())
    assert trained.loss_parts_[-1]["con"] < 0.5 * trained.loss_parts_[0]["con"]
    assert _residual(trained, normals) < 0.5 * _residual(short, normals)
    # the image score is the paper's latent distance
    inputs = torch.from_numpy(normals.load(SIZE).transpose(0, 3, 1, 2)) * 2 - 1
    with torch.no_grad():
        _, latent_in, latent_out = trained.generator_(inputs)
    expected = (latent_in - latent_out).pow(2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(trained.score_samples(normals).image_scores, expected, rtol=1e-4, atol=1e-7)
    residual_scores = trained.set_params(image_score="residual").score_samples(test_set)
    np.testing.assert_allclose(residual_scores.image_scores, residual_scores.anomaly_maps.max(axis=(1, 2)))


def test_ganomaly_reinitialises_a_collapsed_discriminator(normals, monkeypatch):
    monkeypatch.setattr(ganomaly, "DISCRIMINATOR_COLLAPSE", float("inf"))  # every step counts as a collapse
    detector = create_detector("ganomaly", **GAN, epochs=2).fit(normals)
    assert detector.discriminator_resets_ == 2 * len(normals) // GAN["batch_size"]
    weights = detector.discriminator_.features[0].weight
    assert abs(float(weights.detach().std()) - 0.02) < 0.004  # freshly drawn from N(0, 0.02) after the last step


# --- diffusion ----------------------------------------------------------------------------------------------------
DIFFUSION = {"backbone": "resnet18", "pretrained": False, "input_size": 16, "channels": 8, "channel_mults": (1, 2),
             "batch_size": 8, "learning_rate": 2e-3, "t0": 100, "steps": 1, "feature_scoring": False}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_forward_process_matches_the_markov_chain(schedule):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) against x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps."""
    timesteps = 200
    beta, abar = betas(schedule, timesteps), alphas_bar(schedule, timesteps)
    assert (np.diff(abar) < 0).all() and abar[-1] < 1e-3
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.7)
    for t in range(120):
        x = np.sqrt(1 - beta[t]) * x + np.sqrt(beta[t]) * rng.standard_normal(x.shape)
    assert abs(x.mean() - np.sqrt(abar[119]) * 0.7) < 0.01
    assert abs(x.var() - (1 - abar[119])) < 0.01
    if schedule == "linear":  # DDPM's 1e-4..0.02 over 1000 steps, rescaled to T steps
        np.testing.assert_allclose(betas("linear", 1000)[[0, -1]], [1e-4, 0.02])
        np.testing.assert_allclose(beta[[0, -1]], [5e-4, 0.1])


@pytest.fixture(scope="module")
def diffusion_pair(normals):
    short = create_detector("diffusion", **DIFFUSION, epochs=1).fit(normals)
    trained = create_detector("diffusion", **DIFFUSION, epochs=60).fit(normals)
    return short, trained


def test_diffusion_one_step_prediction_improves_with_training(diffusion_pair, normals):
    short, trained = diffusion_pair
    assert np.mean(trained.loss_history_[-5:]) < 0.5 * trained.loss_history_[0]
    error = lambda d: np.abs(np.subtract(*d.reconstruct(normals))).mean()  # noqa: E731
    assert error(trained) < 0.7 * error(short)


def test_diffusion_one_step_is_the_closed_form_x0_prediction(diffusion_pair, normals):
    _, detector = diffusion_pair
    inputs, outputs = detector.set_params(guidance=0.0).reconstruct(normals.subset([0, 1]))
    x = torch.from_numpy(inputs.transpose(0, 3, 1, 2)) * 2 - 1
    a = torch.tensor(alphas_bar("linear", 1000)[100]).float()
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(0))
    noised = a.sqrt() * x + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps = detector.model_(noised, torch.full((2,), 100))
    x0 = ((noised - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    np.testing.assert_allclose(outputs, ((x0 + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    # more DDIM steps and DDAD's guidance change the reconstruction; every setting is deterministic
    pair = normals.subset([0, 1])
    for params in ({"steps": 4}, {"guidance": 3.0}):
        again = detector.set_params(**params).reconstruct(pair)[1]
        assert not np.allclose(again, outputs) and np.array_equal(again, detector.reconstruct(pair)[1])
        detector.set_params(steps=1, guidance=0.0)


def test_diffusion_feature_scoring_combines_maps(normals, test_set):
    detector = create_detector("diffusion", **{**DIFFUSION, "input_size": 32, "feature_scoring": True,
                                               "feature_strides": (4, 8)}, epochs=2).fit(normals)
    assert np.isfinite(detector.pixel_scale_) and detector.pixel_scale_ > 0
    pixel, feature = detector._distances(test_set)
    assert pixel.shape == feature.shape == (8, 32, 32) and (feature >= -1e-6).all()
    scores = detector.set_params(smoothing_sigma=0.0).score_samples(test_set)
    np.testing.assert_allclose(scores.anomaly_maps, feature + detector.pixel_scale_ * pixel, rtol=1e-5, atol=1e-6)
    pixel_only = create_detector("diffusion", **DIFFUSION, epochs=1).fit(normals)
    with pytest.raises(ValueError, match="refit with feature_scoring=True"):
        pixel_only.set_params(feature_scoring=True).score_samples(test_set)


# --- parameter checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, params, match", [
    ("autoencoder", {"input_size": 48}, "power of two"), ("autoencoder", {"loss": "l1"}, "loss"),
    ("autoencoder", {"ssim_weight": 1.5}, "ssim_weight"), ("autoencoder", {"map_metric": "abs"}, "map_metric"),
    ("autoencoder", {"top_k_fraction": 0}, "top_k_fraction"), ("autoencoder", {"epochs": 0}, "epochs"),
    ("ganomaly", {"input_size": 8}, "power of two"), ("ganomaly", {"beta1": 1.5}, "beta1"),
    ("ganomaly", {"w_adv": 0, "w_con": 0, "w_enc": 0}, "at least one"),
    ("ganomaly", {"image_score": "max"}, "image_score"), ("diffusion", {"channels": 12}, "multiple of 8"),
    ("diffusion", {"input_size": 30, "channel_mults": (1, 2, 2)}, "divisible"),
    ("diffusion", {"t0": 1000}, "t0 must be below"), ("diffusion", {"t0": 3, "steps": 5}, "steps"),
    ("diffusion", {"schedule": "sigmoid"}, "schedule"), ("diffusion", {"channel_mults": ()}, "channel_mults"),
])
def test_bad_parameters_raise_clear_errors(family, params, match, normals):
    base = {"autoencoder": AE, "ganomaly": GAN, "diffusion": DIFFUSION}[family]
    with pytest.raises(ValueError, match=match):
        create_detector(family, **{**base, "epochs": 1, **params}).fit(normals)
