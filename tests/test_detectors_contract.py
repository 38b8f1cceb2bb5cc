"""One contract test for every registered detector family (cheap settings come from the family itself)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS
from sklearn.base import clone

from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import Detector, NotFittedError, create_detector, detector_class, list_detectors
from automl_ad.detectors.feature_based import BackboneDetector
from automl_ad.errors import UsageError
from automl_ad.evaluation import image_auroc

AUROC_FLOOR = 0.75


@pytest.fixture(scope="session")
def demo_sets(tmp_path_factory):
    """Small demo categories split into train (normal) and test (normal + defects)."""
    root = generate_demo(tmp_path_factory.mktemp("demo"), n_train=24, n_test_good=8, n_test_per_defect=3, size=96)
    sets = {}
    for category, path in root.items():
        dataset = open_dataset(path)
        test = [r for r in dataset.records if r.split == "test"]
        sets[category] = (ImageSet.from_records(dataset.normal_in("train"), dataset),
                          ImageSet.from_records(test, dataset))
    return sets


def _params(name: str) -> dict:
    cls = detector_class(name)
    params = dict(cls.test_params)
    if issubclass(cls, BackboneDetector):
        if SHARED_WEIGHTS.is_file():
            params.update(backbone="mobilenetv2_100", weights=str(SHARED_WEIGHTS), pretrained=True)
        else:
            params.update(backbone="resnet18", weights=None, pretrained=False)
    return params


@pytest.fixture(scope="module", params=list_detectors())
def fitted(request, demo_sets):
    name = request.param
    cls = detector_class(name)
    train, test = demo_sets[cls.test_category]
    detector = create_detector(name, **_params(name))
    assert detector.fit(train) is detector
    return detector, test


def test_registry_lists_families_and_suggests_names():
    assert {"patchcore", "padim", "fastflow", "stpm", "gaussian", "frequency", "template"} <= set(list_detectors())
    with pytest.raises(UsageError, match="Did you mean 'patchcore'"):
        create_detector("patchcor")
    with pytest.raises(UsageError, match="no parameter 'coreset_ration'.*did you mean 'coreset_ratio'"):
        create_detector("patchcore", coreset_ration=0.1)


@pytest.mark.parametrize("name", list_detectors())
def test_params_and_clone(name):
    detector = create_detector(name, **_params(name))
    params = detector.get_params()
    for key, value in _params(name).items():
        assert params[key] == value
    twin = clone(detector)
    assert twin.get_params() == params and twin is not detector
    assert detector.set_params(**{k: params[k] for k in list(params)[:1]}) is detector
    cls = detector_class(name)
    assert cls.route and isinstance(cls.supports_localization, bool) and isinstance(cls.iterative, bool)


@pytest.mark.parametrize("name", list_detectors())
def test_score_before_fit_raises(name, demo_sets):
    detector = create_detector(name, **_params(name))
    with pytest.raises(NotFittedError):
        detector.score(demo_sets["object"][1])


def test_scores_shapes_and_direction(fitted):
    detector, test = fitted
    scores = detector.score(test)
    assert scores.image_scores.shape == (len(test),)
    if detector.supports_localization:
        assert scores.anomaly_maps.ndim == 3 and len(scores.anomaly_maps) == len(test)
    else:
        assert scores.anomaly_maps is None
    if isinstance(detector, BackboneDetector) and not SHARED_WEIGHTS.is_file():
        pytest.skip("random backbone weights: score direction not meaningful without ../shared/weights")
    assert image_auroc(test.labels, scores.image_scores) >= AUROC_FLOOR


def test_save_load_gives_identical_scores(fitted, tmp_path):
    detector, test = fitted
    before = detector.score(test)
    loaded = Detector.load(detector.save(tmp_path / "model"))
    assert type(loaded) is type(detector) and loaded.get_params() == detector.get_params()
    after = loaded.score(test)
    np.testing.assert_allclose(after.image_scores, before.image_scores, rtol=1e-5, atol=1e-6)
    if before.anomaly_maps is not None:
        np.testing.assert_allclose(after.anomaly_maps, before.anomaly_maps, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "model" / "tensors.safetensors").is_file()
    assert not list((tmp_path / "model").glob("*.pkl"))


def test_fit_rejects_anomalous_images(fitted):
    detector, test = fitted
    with pytest.raises(ValueError, match="normal images only"):
        clone(detector).fit(test)


def test_single_image_scoring(fitted):
    detector, test = fitted
    one = ImageSet.from_arrays([test.load(96)[0]])
    assert detector.score(one).image_scores.shape == (1,)


@pytest.mark.parametrize("name", [n for n in list_detectors() if detector_class(n).iterative])
def test_iterative_families_report_interim_quality(name, demo_sets):
    """Every iterative family can be scored mid-training (the search's early stopping needs it), and scoring
    mid-training leaves the fit as it would have been."""
    cls = detector_class(name)
    train, test = demo_sets[cls.test_category]
    interim = []

    def on_epoch(epoch: int, metrics: dict) -> bool:
        assert "score" in metrics, f"{name} reports no interim score"
        interim.append(metrics["score"](test.subset(range(4))))
        return False

    detector = create_detector(name, **_params(name)).fit(train, on_epoch=on_epoch)
    assert interim and all(np.isfinite(s.image_scores).all() and s.image_scores.shape == (4,) for s in interim)
    reference = create_detector(name, **_params(name)).fit(train)
    np.testing.assert_allclose(detector.score(test).image_scores, reference.score(test).image_scores, rtol=1e-4,
                               atol=1e-5)
