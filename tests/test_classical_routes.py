"""Robust PCA (image decomposition), sparse coding and the one-class SVM (classification surface) on small
synthetic data: each test checks the property the method rests on, so a broken method fails it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import Detector, create_detector
from automl_ad.detectors.rpca.detector import robust_pca
from automl_ad.search.space import load_space

SIZE = 64


def _periodic(seed: int, size: int = SIZE) -> np.ndarray:
    """A texture that repeats along both image axes (period 8 px) with a random phase, plus sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    py, px = rng.uniform(0, 2 * np.pi, 2)
    image = 0.5 + 0.2 * np.sin(2 * np.pi * x / 8 + px) + 0.2 * np.sign(np.sin(2 * np.pi * y / 8 + py))
    return np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float32)


def _with_blob(image: np.ndarray, centre=(40, 20), radius=4.0, value=0.0) -> np.ndarray:
    y, x = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    alpha = np.clip(radius + 0.5 - np.hypot(y - centre[0], x - centre[1]), 0, 1)
    return (image + alpha * (value - image)).astype(np.float32)


def _peak(anomaly_map: np.ndarray) -> np.ndarray:
    return np.array(np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape))


# --- robust PCA -----------------------------------------------------------------------------------------------
def test_robust_pca_recovers_low_rank_and_sparse_parts():
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(80, 3)) @ rng.normal(size=(3, 60))
    sparse = np.zeros_like(low_rank)
    support = rng.random(low_rank.shape) < 0.05
    sparse[support] = rng.choice([-5.0, 5.0], support.sum())
    found_low, found_sparse, iterations = robust_pca(low_rank + sparse, 1 / np.sqrt(80), 1e-7, 500)
    assert np.linalg.norm(found_low - low_rank) / np.linalg.norm(low_rank) < 1e-3
    assert np.array_equal(np.abs(found_sparse) > 0.5, support)
    assert np.linalg.matrix_rank(found_low, tol=1e-3 * np.linalg.norm(found_low, 2)) == 3
    assert 1 < iterations < 500


def test_robust_pca_flags_a_defect_on_a_periodic_texture():
    detector = create_detector("rpca", input_size=SIZE, lambda_scale=1.0, smoothing_sigma=1.0)
    detector.fit(ImageSet.from_arrays([_periodic(0)]))
    normals = [_periodic(seed) for seed in range(1, 5)]
    scores = detector.score_samples(ImageSet.from_arrays(normals + [_with_blob(_periodic(9))]))
    assert scores.image_scores[-1] > 2 * scores.image_scores[:-1].max()
    assert np.abs(_peak(scores.anomaly_maps[-1]) - (40, 20)).max() <= 4


# --- sparse coding --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_coder():
    detector = create_detector("sparse_coding", input_size=SIZE, patch_size=8, stride=4, n_atoms=24, alpha=0.1,
                               max_patches=3000, max_iter=10, smoothing_sigma=1.0)
    return detector.fit(ImageSet.from_arrays([_periodic(seed) for seed in range(8)]))


def test_sparse_coding_codes_normal_patches_better_than_foreign_ones(sparse_coder):
    normal, _ = sparse_coder._patches(_periodic(20))
    foreign, _ = sparse_coder._patches(np.random.default_rng(1).uniform(0.1, 0.9, (SIZE, SIZE)).astype(np.float32))
    normal_error = sparse_coder._indicators(normal)[:, 0].mean()
    foreign_error = sparse_coder._indicators(foreign)[:, 0].mean()
    assert foreign_error > 3 * normal_error


def test_sparse_coding_localises_a_defect(sparse_coder):
    scores = sparse_coder.score_samples(ImageSet.from_arrays([_periodic(21), _periodic(22), _with_blob(_periodic(23))]))
    assert scores.image_scores[2] > scores.image_scores[:2].max()
    assert np.abs(_peak(scores.anomaly_maps[2]) - (40, 20)).max() <= 6


# --- one-class SVM --------------------------------------------------------------------------------------------
def _backbone_params() -> dict:
    return {"backbone": "resnet18", "pretrained": False, "input_size": SIZE, "device": "cpu"}


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs pretrained backbone features (random ones do not "
                    "separate these outliers reliably; the ranking depended on the random initialisation)")
def test_ocsvm_ranks_outliers_above_inliers_and_matches_sklearn(tmp_path):
    from sklearn.svm import OneClassSVM

    train = ImageSet.from_arrays([_periodic(seed) for seed in range(12)])
    params = {**_backbone_params(), "backbone": "mobilenetv2_100", "weights": str(SHARED_WEIGHTS), "pretrained": True}
    detector = create_detector("ocsvm", **params, nu=0.2).fit(train)
    rng = np.random.default_rng(0)
    outliers = [rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32), np.full((SIZE, SIZE), 0.9, np.float32)]
    test = ImageSet.from_arrays([_periodic(seed) for seed in range(30, 34)] + outliers)
    scores = detector.score_samples(test)
    assert scores.anomaly_maps is None
    assert scores.image_scores[-2:].min() > scores.image_scores[:-2].max()
    # the saved arrays reproduce scikit-learn's decision function, and reload gives the same scores
    boundary = detector.boundary_

    def standardise(images):
        return (detector._pooled(detector._features(images)) - boundary.mean) / boundary.scale

    svm = OneClassSVM(kernel="rbf", nu=0.2, gamma=boundary.gamma).fit(standardise(train))
    np.testing.assert_allclose(-scores.image_scores, svm.decision_function(standardise(test)), rtol=1e-6, atol=1e-8)
    loaded = Detector.load(detector.save(tmp_path / "model"))
    np.testing.assert_allclose(loaded.score_samples(test).image_scores, scores.image_scores, rtol=1e-6)


def test_ocsvm_sliding_regions_give_maps(tmp_path):
    detector = create_detector("ocsvm", **_backbone_params(), feature_strides=(8, 16), localization="sliding",
                               window=2, max_windows=400)
    detector.fit(ImageSet.from_arrays([_periodic(seed) for seed in range(10)]))
    test = ImageSet.from_arrays([_periodic(40), _with_blob(_periodic(41), radius=8, value=1.0)])
    scores = detector.score_samples(test)
    assert scores.anomaly_maps.shape == (2, SIZE, SIZE)
    loaded = Detector.load(detector.save(tmp_path / "model"))
    np.testing.assert_allclose(loaded.score_samples(test).anomaly_maps, scores.anomaly_maps, rtol=1e-5, atol=1e-6)


# --- parameters and search spaces ----------------------------------------------------------------------------
@pytest.mark.parametrize("family, params, message", [
    ("rpca", {"lambda_scale": 0}, "lambda_scale must be > 0"),
    ("rpca", {"top_fraction": 2}, r"top_fraction must be in \[0, 1\]"),
    ("sparse_coding", {"transform_algorithm": "ista"}, "transform_algorithm must be one of"),
    ("sparse_coding", {"patch_size": 128, "input_size": 64}, "patch_size .* must not exceed input_size"),
    ("ocsvm", {"nu": 0}, r"nu must be in \(0, 1\]"),
    ("ocsvm", {"localization": "grid"}, "localization must be one of"),
])
def test_bad_parameters_raise(family, params, message):
    extra = _backbone_params() if family == "ocsvm" else {}
    detector = create_detector(family, **{**extra, **params})
    with pytest.raises(ValueError, match=message):
        detector.fit(ImageSet.from_arrays([_periodic(0), _periodic(1)]))


@pytest.mark.parametrize("family", ["rpca", "sparse_coding", "ocsvm"])
def test_search_space_loads(family):
    assert load_space(family).family == family
