"""Cross-conformal calibration: with too few held-out normals for the target false-alarm rate, export scores each
training normal by a refit of the model that never saw it, and calibrates on all of those scores."""

from __future__ import annotations

import numpy as np
import pytest

from automl_ad import load_package
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.data.split import SearchSplit
from automl_ad.deploy.export import calibrate
from automl_ad.deploy.out_of_fold import on_scale_of, out_of_fold_scores, refit_refusal
from automl_ad.deploy.package import export_package
from automl_ad.detectors import create_detector


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 training normals, and 4 normal + 4 defective images that play the held-out validation."""
    root = generate_demo(tmp_path_factory.mktemp("demo"), categories=["object"], n_train=16, n_test_good=4,
                         n_test_per_defect=2, size=64)["object"]
    dataset = open_dataset(root)
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)
    validation = ImageSet.from_records([r for r in dataset.records if r.split == "test"], dataset)
    return train, validation


def test_each_training_image_is_scored_by_a_refit_that_never_saw_it(images):
    """PatchCore keeping every patch scores its own training images near zero (each finds itself in the bank);
    out of fold, they score like the held-out normals the full model never saw."""
    train, validation = images
    detector = create_detector("patchcore", **{**create_detector("patchcore").test_params, "coreset_ratio": 1.0},
                               smoothing_sigma=0.0).fit(train)
    normals = validation.subset(np.flatnonzero(validation.labels == 0))
    held_out = detector.score_samples(normals).image_scores
    in_sample = detector.score_samples(train).image_scores
    unseen = out_of_fold_scores(detector, train, normals, held_out, folds=4, progress=False)
    assert in_sample.max() < 0.05 * np.median(held_out)
    assert unseen.shape == (len(train),) and np.isfinite(unseen).all()
    assert 0.5 < np.median(unseen) / np.median(held_out) < 2.0


def test_a_refits_scores_are_put_on_the_full_models_scale():
    """Matched on the held-out normals both scored: by the median ratio for positive scores (distances), by the
    median difference otherwise (log-likelihoods, signed margins)."""
    np.testing.assert_allclose(on_scale_of(np.array([4.0, 8.0]), [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]), [2.0, 4.0])
    np.testing.assert_allclose(on_scale_of(np.array([1.0, 3.0]), [-1.0, 0.0, 1.0], [-3.0, -2.0, -1.0]), [-1.0, 1.0])


def test_too_few_held_out_normals_are_joined_by_the_training_normals_scored_out_of_fold(images, tmp_path):
    train, validation = images
    detector = create_detector("gaussian", input_size=64, scales=(1.0, 2.0)).fit(train)
    split = SearchSplit(train, validation, ImageSet(paths=[], labels=[], mask_paths=[]), "real")
    said = []
    calibration = calibrate(detector, split, far=0.01, say=said.append)
    image = calibration.thresholds["image"]
    assert (image["n_normal"], image["n_out_of_fold"]) == (4 + 16, 16)
    assert any("refitting the model on 5 folds of the 16 training images" in line for line in said), said
    assert any("20 normal scores (4 held-out images and 16 training images scored out of fold)" in w
               for w in calibration.warnings), calibration.warnings
    setters = {path for path, _ in calibration.threshold_setters}
    assert setters <= {str(p) for p in list(train.paths) + list(validation.paths)} and setters
    # the package keeps the count, and loads
    path = export_package(detector, tmp_path / "pkg", calibration.thresholds, parity_images=validation.subset([0, 4]))
    assert load_package(path).manifest["thresholds"]["image"]["n_out_of_fold"] == 16

    # a target the held-out normals can set alone refits nothing
    enough = calibrate(detector, split, far=0.25, say=said.append)
    assert (enough.thresholds["image"]["n_normal"], enough.thresholds["image"]["n_out_of_fold"]) == (4, 0)


def test_a_model_that_refits_slowly_is_calibrated_on_the_held_out_normals_alone_and_says_why(images):
    train, validation = images
    detector = create_detector("gaussian", input_size=64, scales=(1.0,)).fit(train)
    assert refit_refusal(detector, len(train)) is None
    assert "too few to refit" in refit_refusal(detector, 6)
    detector.fit_seconds_ = 200.0
    assert "4 refits would take about 600 s" in refit_refusal(detector, len(train), folds=4)
    iterative = create_detector("autoencoder")
    assert "trains iteratively" in refit_refusal(iterative, 1000)
    split = SearchSplit(train, validation, ImageSet(paths=[], labels=[], mask_paths=[]), "real")
    calibration = calibrate(detector, split, far=0.01, say=lambda _: None)
    assert calibration.thresholds["image"]["n_out_of_fold"] == 0
    assert any("not scored out of fold: 5 refits would take about 800 s" in w for w in calibration.warnings)


def test_with_a_few_real_defects_the_low_detection_warning_judges_them_not_the_synthetic_anomalies_beside_them():
    """Mixed validation: synthetic anomalies are easier to catch than the few real defects beside them. A threshold
    that catches every synthetic anomaly and neither real defect detects half the anomalies, which is not under
    half: the warning used to stay silent while no real defect was caught."""
    from automl_ad.detectors.base import Scores

    class Fixed:
        trains_on_anomalies, iterative = (), False

        def score_samples(self, images):
            return Scores(np.array([float(p.split("-")[1]) for p in images.paths]))

    normal = [f"n-{v}" for v in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
    real, synthetic = ["d-3", "d-4"], ["s-20", "s-30"]
    validation = ImageSet(paths=normal + real + synthetic, labels=np.r_[np.zeros(9, int), np.ones(4, int)],
                          kinds=[None] * 11 + ["cutpaste", "scar"])
    split = SearchSplit(ImageSet(paths=[], labels=[]), validation, ImageSet(paths=[], labels=[], mask_paths=[]),
                        "mixed")
    calibration = calibrate(Fixed(), split, far=0.2, say=lambda _: None)
    assert calibration.validation_rates["detection_rate"] == 0.5
    warning = next(w for w in calibration.warnings if "detects only" in w)
    assert "detects only 0% of the validation real defects" in warning, warning
