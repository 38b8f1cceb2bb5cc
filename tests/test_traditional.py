"""Traditional families (template matching, Gaussian model, frequency domain) on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import Detector, NotApplicableError, create_detector

SIZE = 64


def _part(shift=(0.0, 0.0), size=SIZE, noise=0.01, seed=0) -> np.ndarray:
    """A machined part (disc, bore, keyway, two holes, a bright ring) on a dark background, shifted by (dy, dx)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    y, x = y - shift[0], x - shift[1]
    r = np.hypot(x, y)
    inside = lambda distance: np.clip(distance + 0.5, 0, 1)  # noqa: E731 - anti-aliased edge
    metal = inside(22 - r) * (1 - inside(6 - r)) * (1 - inside(np.minimum(2.5 - np.abs(x), 9 - np.abs(y + 6))))
    for cx in (-12, 12):
        metal *= 1 - inside(3.5 - np.hypot(x - cx, y - 8))
    image = 0.1 + 0.6 * metal + 0.2 * inside(1.5 - np.abs(r - 16)) * metal
    return np.clip(image + np.random.default_rng(seed).normal(0, noise, image.shape), 0, 1).astype(np.float32)


def _brick_crops(count: int, seed: int = 0) -> list[np.ndarray]:
    """Random, randomly placed crops of scikit-image's brick wall (an unaligned texture)."""
    brick = skdata.brick().astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        y0, x0 = rng.integers(0, brick.shape[0] - 2 * SIZE, size=2)
        crops.append(brick[y0 : y0 + 2 * SIZE : 2, x0 : x0 + 2 * SIZE : 2])
    return crops


def _grating(phase: float, seed: int) -> np.ndarray:
    """A periodic texture: a diagonal sinusoid grating (period 8 px) plus sensor noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = 0.5 + 0.3 * np.sin(2 * np.pi * (x + y) / 8 + phase)
    return np.clip(image + np.random.default_rng(seed).normal(0, 0.01, image.shape), 0, 1).astype(np.float32)


def _paste_blob(image: np.ndarray, centre: tuple[int, int], radius: float = 4.0, value: float = 0.95) -> np.ndarray:
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    alpha = np.clip(radius + 0.5 - np.hypot(y - centre[0], x - centre[1]), 0, 1)
    return (image + alpha * (value - image)).astype(np.float32)


def _peak(scores) -> tuple[int, int]:
    return np.unravel_index(int(np.argmax(scores.anomaly_maps[0])), scores.anomaly_maps[0].shape)


# --- template matching ----------------------------------------------------------------------------------------
def test_template_refuses_unaligned_textures():
    detector = create_detector("template", input_size=SIZE)
    with pytest.raises(NotApplicableError, match=r"needs aligned images: .* correlate only 0\.\d\d .*needs >= 0\.5"):
        detector.fit(ImageSet.from_arrays(_brick_crops(12)))


def test_template_registers_shifted_parts_and_localises_a_defect():
    rng = np.random.default_rng(1)
    shifts = rng.uniform(-4, 4, size=(10, 2))
    train = ImageSet.from_arrays([_part(tuple(s), seed=i) for i, s in enumerate(shifts)])
    detector = create_detector("template", input_size=SIZE, smoothing_sigma=1.0).fit(train)
    assert detector.alignment_ > 0.8

    shift = (5.0, -3.0)  # larger than any training shift: only registration can explain it
    normal = _part(shift, seed=100)
    defect_at = (int(SIZE / 2 + shift[0] - 16), int(SIZE / 2 + shift[1]))  # on the bright ring of the moved part
    defective = _paste_blob(normal, defect_at, radius=2.5, value=0.0)
    scores = detector.score_samples(ImageSet.from_arrays([defective, normal]))
    assert scores.image_scores[0] > 2 * scores.image_scores[1]
    assert np.hypot(*(np.array(_peak(scores)) - defect_at)) <= 3  # the map is in the test image's frame


# --- frequency domain -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["poft", "spectrum"])
def test_frequency_suppresses_a_grating_and_keeps_a_blob(method):
    rng = np.random.default_rng(2)
    train = ImageSet.from_arrays([_grating(phase, i) for i, phase in enumerate(rng.uniform(0, 2 * np.pi, 8))])
    detector = create_detector("frequency", input_size=SIZE, method=method, smoothing_sigma=2.0).fit(train)
    clean = _grating(1.0, seed=50)
    noise_only = np.clip(0.5 + np.random.default_rng(50).normal(0, 0.01, clean.shape), 0, 1).astype(np.float32)
    scores = detector.score_samples(ImageSet.from_arrays([_paste_blob(clean, (20, 40)), clean, noise_only]))
    assert scores.image_scores[0] > 3 * scores.image_scores[1]
    assert np.hypot(*(np.array(_peak(scores)) - (20, 40))) <= 5
    # the grating, the image's dominant content, is gone: what is left is the residual of the sensor noise alone
    grating_left, noise_left = np.abs(scores.anomaly_maps[1]).mean(), np.abs(scores.anomaly_maps[2]).mean()
    assert abs(grating_left - noise_left) < 0.25 * noise_left


# --- Gaussian model -------------------------------------------------------------------------------------------
def test_gaussian_auto_mode_follows_alignment():
    aligned = ImageSet.from_arrays([_part((0.0, 0.0), seed=i) for i in range(8)])
    textures = ImageSet.from_arrays(_brick_crops(8))
    assert create_detector("gaussian", input_size=SIZE).fit(aligned).mode_ == "per_position"
    assert create_detector("gaussian", input_size=SIZE).fit(textures).mode_ == "shared"


@pytest.mark.parametrize("mode", ["per_position", "shared"])
def test_gaussian_flags_a_blob_and_round_trips(mode, tmp_path):
    train = ImageSet.from_arrays([_part((0.0, 0.0), seed=i) for i in range(8)])
    detector = create_detector("gaussian", input_size=SIZE, mode=mode, scales=(1.0, 2.0), smoothing_sigma=2.0)
    detector.fit(train)
    normal = _part((0.0, 0.0), seed=77)
    images = ImageSet.from_arrays([_paste_blob(normal, (32, 14), value=0.0), normal])
    scores = detector.score_samples(images)
    assert scores.image_scores[0] > scores.image_scores[1]
    assert np.hypot(*(np.array(_peak(scores)) - (32, 14))) <= 6  # on the blob or its rim
    again = Detector.load(detector.save(tmp_path / mode)).score_samples(images)
    np.testing.assert_allclose(again.anomaly_maps, scores.anomaly_maps, rtol=1e-5, atol=1e-6)


# --- parameters -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, params, message", [
    ("gaussian", {"mode": "pixel"}, "mode must be one of"),
    ("gaussian", {"covariance": "empirical"}, "covariance must be one of"),
    ("gaussian", {"scales": ()}, "scales must be"),
    ("frequency", {"method": "fft"}, "method must be one of"),
    ("frequency", {"peak_threshold": 0}, "peak_threshold must be > 0"),
    ("template", {"min_alignment": 2}, "min_alignment must be"),
    ("template", {"opening_size": 0}, "opening_size must be"),
])
def test_bad_parameters_raise(family, params, message):
    train = ImageSet.from_arrays([_part(seed=i) for i in range(3)])
    with pytest.raises(ValueError, match=message):
        create_detector(family, input_size=SIZE, **params).fit(train)


def test_template_rotation_search_goes_coarse_to_fine_and_finds_the_angle_every_angle_finds(monkeypatch):
    """A part turned by 8.5 degrees (off the coarse pass's 3-degree grid) is registered at the angle that trying all
    61 angles of a +-15-degree search finds, with 21 registrations."""
    import skimage.registration
    from scipy import ndimage

    from automl_ad.detectors.template.detector import _ncc, rotation_angles

    reference = _part(size=128)
    turned = ndimage.rotate(reference, 8.5, reshape=False, order=1, mode="nearest")
    calls = []
    original = skimage.registration.phase_cross_correlation
    monkeypatch.setattr(skimage.registration, "phase_cross_correlation",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    detector = create_detector("template", input_size=128, max_rotation=15.0, rotation_step=0.5)
    registered, angle, _ = detector._register(turned, reference)
    assert len(calls) == 21 and angle == pytest.approx(-8.5)
    unturned = create_detector("template", max_rotation=0.0)
    every = {a: _ncc(unturned._register(ndimage.rotate(turned, a, reshape=False, order=1, mode="nearest"),
                                        reference)[0], reference) for a in rotation_angles(15.0, 0.5)}
    assert max(every, key=every.get) == pytest.approx(angle)
    assert _ncc(registered, reference) > 0.99
