"""One contract test for every registered detector family (cheap settings come from the family itself)."""

from __future__ import annotations

import inspect
import time
from numbers import Integral

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS
from sklearn.base import clone

from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import Detector, NotFittedError, create_detector, detector_class, list_detectors
from automl_ad.detectors.feature_based import BackboneDetector
from automl_ad.detectors.parameters import Interval, parameter_problem
from automl_ad.errors import InvalidParameterError, UsageError
from automl_ad.evaluation import image_auroc
from automl_ad.knowledge import load_knowledge
from automl_ad.search.space import Parameter, SearchSpace, load_space, searchable_families

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
        detector.score_samples(demo_sets["object"][1])


def test_scores_shapes_and_direction(fitted):
    detector, test = fitted
    scores = detector.score_samples(test)
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
    before = detector.score_samples(test)
    loaded = Detector.load(detector.save(tmp_path / "model"))
    assert type(loaded) is type(detector) and loaded.get_params() == detector.get_params()
    after = loaded.score_samples(test)
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
    assert detector.score_samples(one).image_scores.shape == (1,)


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

    params = {**_params(name), "epochs": 3}  # what is checked needs no accuracy: 3 epochs (diffusion's 150 took 42 s)
    detector = create_detector(name, **params).fit(train, on_epoch=on_epoch)
    assert len(interim) == 3 and all(np.isfinite(s.image_scores).all() and s.image_scores.shape == (4,)
                                     for s in interim)
    reference = create_detector(name, **params).fit(train)
    np.testing.assert_allclose(detector.score_samples(test).image_scores,
                               reference.score_samples(test).image_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in list_detectors() if detector_class(n).iterative])
def test_iterative_families_stop_mid_epoch_at_the_fit_deadline(name, demo_sets, monkeypatch):
    """Past its deadline an iterative fit ends with the batch running then, not at the end of the epoch (one
    CutPaste epoch outlasted a search trial's limit), says so, and still gives a model that scores."""
    cls = detector_class(name)
    train, test = demo_sets[cls.test_category]
    batches, reports = [], []
    original = Detector._until_deadline

    def counted(self, epoch_batches):
        for batch in original(self, epoch_batches):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(Detector, "_until_deadline", counted)
    detector = create_detector(name, **{**_params(name), "epochs": 3})
    detector.fit(train, on_epoch=lambda epoch, metrics: reports.append(epoch), deadline=time.monotonic() - 1)
    assert len(batches) == 1 and detector.epochs_trained_ == 1 and detector.fit_cut_by_time_ and not reports
    assert np.isfinite(detector.loss_history_).all()
    assert np.isfinite(detector.score_samples(test).image_scores).all()


def test_declared_attributes_after_fit_and_load(fitted, tmp_path):
    """The attributes Detector declares are there, with their declared meaning, after fit and after load."""
    detector, _ = fitted
    loaded = Detector.load(detector.save(tmp_path / "model"))
    for model in (detector, loaded):
        assert model.input_size == model.get_params()["input_size"]
        assert isinstance(model.gray, bool)
        assert isinstance(model.loss_history_, list) and model.n_train_ == detector.n_train_
        if model.iterative:
            assert model.epochs_trained_ == len(model.loss_history_) >= 1
            assert all(np.isfinite(loss) for loss in model.loss_history_)
        else:
            assert model.epochs_trained_ is None and model.loss_history_ == []
    assert loaded.loss_history_ == detector.loss_history_ and loaded.epochs_trained_ == detector.epochs_trained_


def test_score_is_a_deprecated_alias_of_score_samples(demo_sets):
    train, test = demo_sets["object"]
    detector = create_detector("gaussian", **_params("gaussian")).fit(train)
    with pytest.warns(DeprecationWarning, match=r"score_samples\(images\)"):
        old = detector.score(test)
    np.testing.assert_array_equal(old.image_scores, detector.score_samples(test).image_scores)


# --- declared parameter constraints ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_detectors())
def test_constraints_declare_exactly_the_constructor_parameters(name):
    cls = detector_class(name)
    assert set(cls._parameter_constraints) == set(cls._get_param_names())
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    for key, value in {**defaults, **cls.test_params}.items():
        assert parameter_problem(name, cls._parameter_constraints, key, value) is None


def _out_of_range_values(constraints: list) -> list:
    """Values just outside each bound of the Interval constraints of one parameter."""
    values = []
    for constraint in constraints:
        if isinstance(constraint, Interval):
            step = 1 if constraint.kind is Integral else 1e-3
            if constraint.low is not None:
                values.append(constraint.low if not constraint.left_closed else constraint.low - step)
            if constraint.high is not None:
                values.append(constraint.high if not constraint.right_closed else constraint.high + step)
    return [v for v in values if not any(c.allows(v) for c in constraints if isinstance(c, Interval))]


@pytest.mark.parametrize("name", list_detectors())
def test_fit_rejects_every_parameter_outside_its_constraints(name):
    """fit checks the constraints before anything else (so even an empty training set reports the parameter)."""
    cls = detector_class(name)
    empty = ImageSet.from_arrays([])
    for key, constraints in cls._parameter_constraints.items():
        for bad in [object(), *_out_of_range_values(constraints)]:
            detector = create_detector(name, **{**_params(name), key: bad})
            with pytest.raises(InvalidParameterError, match=rf"^{name}: {key} must be .*, got "):
                detector.fit(empty)


def test_out_of_range_message_names_family_parameter_value_and_range(demo_sets):
    detector = create_detector("patchcore", **{**_params("patchcore"), "coreset_ratio": -1})
    with pytest.raises(InvalidParameterError) as info:
        detector.fit(demo_sets["object"][0])
    assert str(info.value) == r"patchcore: coreset_ratio must be in (0, 1], got -1"
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidParameterError, match="index must be one of 'exact', 'hnsw', got 'ivf'"):
        create_detector("patchcore", index="ivf").fit(demo_sets["object"][0])


def test_score_samples_checks_parameters_set_after_fit(demo_sets):
    train, test = demo_sets["object"]
    detector = create_detector("gaussian", **_params("gaussian")).fit(train)
    with pytest.raises(InvalidParameterError, match="smoothing_sigma must be >= 0, got -1"):
        detector.set_params(smoothing_sigma=-1).score_samples(test)


def test_load_checks_saved_parameters(demo_sets, tmp_path):
    detector = create_detector("gaussian", **_params("gaussian")).fit(demo_sets["object"][0])
    path = detector.save(tmp_path / "model") / "detector.json"
    path.write_text(path.read_text().replace('"covariance": "ledoit_wolf"', '"covariance": "pickle"'))
    with pytest.raises(InvalidParameterError, match=r"detector\.json: gaussian: covariance must be one of"):
        Detector.load(tmp_path / "model")


def test_a_family_must_declare_constraints_for_its_parameters():
    with pytest.raises(TypeError, match=r"undeclared: \['depth'\]"):
        class Incomplete(Detector):
            name, route = "incomplete", "statistical"
            _parameter_constraints = {}

            def __init__(self, depth=3):
                self.depth = depth


# --- search spaces against the constraints --------------------------------------------------------------------
def space_problems(space: SearchSpace) -> list[str]:
    """Every bound of a numeric range and every choice of ``space`` that its family's constraints reject."""
    declared = detector_class(space.family)._parameter_constraints
    problems = []
    for p in space.parameters:
        if p.type in ("float", "int"):
            values = [int(p.low), int(p.high)] if p.type == "int" else [p.low, p.high]
        else:
            values = list(p.choices)
        for value in values:
            problem = parameter_problem(space.family, declared, p.name, value)
            if problem:
                problems.append(problem)
    return problems


@pytest.mark.parametrize("family", searchable_families())
def test_search_space_lies_within_the_declared_constraints(family):
    assert space_problems(load_space(family)) == []


def test_space_check_reports_an_out_of_range_bound_or_choice():
    space = SearchSpace("patchcore", (
        Parameter("coreset_ratio", "float", 0.001, 1.5, log=True),  # high bound above 1
        Parameter("num_neighbors", "int", 0.0, 9.0),  # low bound below 1
        Parameter("smoothing_sigma", "float", 0.0, 8.0),  # fine
        Parameter("index", "categorical", choices=("exact", "ivf")),
        Parameter("feature_strides", "categorical", choices=((8, 16), (6, 12))),
    ))
    assert space_problems(space) == [
        "patchcore: coreset_ratio must be in (0, 1], got 1.5",
        "patchcore: num_neighbors must be an integer >= 1, got 0",
        "patchcore: index must be one of 'exact', 'hnsw', got 'ivf'",
        "patchcore: feature_strides must be a tuple of one or more values, each a power of two >= 2 (e.g. 2, 4, 8), "
        "got (6, 12)",
    ]


# --- knowledge base ---------------------------------------------------------------------------------------------
def test_each_family_route_is_a_knowledge_base_route_that_lists_it():
    routes = load_knowledge().routes
    for name in list_detectors():
        route = detector_class(name).route
        assert route in routes, f"{name}: route '{route}' is not in routes.yaml ({', '.join(routes)})"
        assert name in routes[route].families, f"routes.yaml: route '{route}' does not list family '{name}'"
    listed = {family for route in routes.values() for family in route.families}
    assert listed == set(list_detectors())
