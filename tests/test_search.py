"""The search: spaces, synthetic anomalies, Pareto ranks, and a tiny end-to-end search with resume."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from automl_ad.data.synthetic import KINDS, MAX_REGIONS, make_anomaly
from automl_ad.detectors import create_detector, list_detectors
from automl_ad.errors import ConfigError
from automl_ad.evaluation.objectives import pareto_ranks
from automl_ad.search.space import load_space


@pytest.mark.parametrize("family", list_detectors())
def test_every_family_has_a_space_whose_samples_construct(family):
    space = load_space(family)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        values = space.sample(study.ask(), prefix=f"{family}/")
        assert values, family
        detector = create_detector(family, **values)
        assert all(detector.get_params()[k] == v for k, v in values.items())


def test_space_errors_name_the_file_and_suggest(tmp_path):
    (tmp_path / "patchcore.yaml").write_text("parameters:\n  coreset_ration: {type: float, low: 0.01, high: 0.1}\n")
    with pytest.raises(ConfigError, match="did you mean 'coreset_ratio'"):
        load_space("patchcore", tmp_path)
    (tmp_path / "padim.yaml").write_text("parameters:\n  epsilon: {type: float, low: 0.1, high: 0.01}\n")
    with pytest.raises(ConfigError, match="low < high"):
        load_space("padim", tmp_path)
    (tmp_path / "gaussian.yaml").write_text(
        "parameters:\n  regularisation: {type: float, low: 0.1, high: 1, when: {mode: shared}}\n")
    with pytest.raises(ConfigError, match="listed before"):
        load_space("gaussian", tmp_path)


def test_conditional_parameters_follow_their_condition():
    space = load_space("frequency")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.sample(study.ask())
        assert ("peak_threshold" in values) == (values["method"] == "spectrum")


def test_pareto_ranks_by_hand():
    # quality max, throughput max, memory min
    values = np.array([[0.9, 10, 500], [0.8, 100, 400], [0.7, 50, 600], [0.9, 10, 400]])
    ranks = pareto_ranks(values, ["max", "max", "min"])
    assert ranks.tolist() == [1, 0, 1, 0]  # 0 is dominated by 3; 2 by 1


def test_throughput_and_memory_within_the_tie_share_do_not_keep_a_poor_model_on_the_front():
    """Session 15's odd dataset E: a PatchCore trial of quality 0.588 held the front by 9 MB less of 1164."""
    values = np.array([[0.965, 40.0, 1164.0], [0.588, 40.5, 1155.0], [0.900, 80.0, 1160.0]])
    assert pareto_ranks(values, ["max", "max", "min"]).tolist() == [0, 1, 0]  # 2 is 2x faster: it stays
    assert pareto_ranks(values, ["max", "max", "min"], ties=[0.0, 0.0, 0.0]).tolist() == [0, 0, 0]
    # equal quality, 3% faster: both stay (within the tie, neither is better)
    assert pareto_ranks(np.array([[0.9, 100.0, 1000.0], [0.9, 103.0, 1000.0]])).tolist() == [0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_anomaly_changes_only_its_mask(kind):
    from skimage import data

    image = data.brick()[:128, :128].astype(np.float32) / 255
    out, mask = make_anomaly(image, kind, np.random.default_rng(3))
    assert out.shape == image.shape and mask.shape == image.shape and mask.any() and not mask.all()
    assert np.abs(out - image)[mask].mean() >= 0.05
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_a_perlin_anomaly_keeps_only_its_largest_regions():
    """At its finest scales a Perlin mask breaks into hundreds of specks, each a region to AUPRO: the anomaly keeps
    its MAX_REGIONS largest and the image is restored around them."""
    from scipy import ndimage
    from skimage import data

    image = data.brick()[:256, :256].astype(np.float32) / 255
    counts = []
    for seed in range(12):
        out, mask = make_anomaly(image, "perlin", np.random.default_rng(seed))
        counts.append(ndimage.label(mask, structure=np.ones((3, 3)))[1])
        np.testing.assert_array_equal(out[~mask], image[~mask])
    assert 1 <= min(counts) and max(counts) == MAX_REGIONS  # some draws had more and were cut


def test_two_searches_write_one_store_without_mixing(tmp_path):
    """Two processes log searches concurrently to one SQLite store; each keeps exactly its own trials."""
    import subprocess
    import sys

    from automl_ad.tracking.store import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).experiment("shared")  # create the schema once, as the first search would
    script = (
        "import sys\n"
        "from automl_ad.tracking.store import Tracker\n"
        "t = Tracker(sys.argv[1]); e = t.experiment('shared')\n"
        "p = t.start_search(e, sys.argv[2], {'n': 8}, {}, [])\n"
        "for i in range(8):\n"
        "    t.log_trial(e, p, {'trial_id': f'{sys.argv[2]}-{i}', 'family': 'gaussian', 'status': 'ok',\n"
        "                       'quality': i / 8, 'throughput': 10.0 + i, 'memory_mb': 500.0}, [])\n"
        "t.tag_front(p); t.finish_search(p); print(p)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, name], stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    parents = [proc.communicate(timeout=240)[0].strip().splitlines()[-1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    tracker = Tracker(uri)
    for parent, name in zip(parents, ("a", "b")):
        trials = tracker.trials(parent)
        assert sorted(r.data.tags["trial"] for r in trials) == sorted(f"{name}-{i}" for i in range(8))
        assert sum(r.data.tags.get("pareto_front") == "True" for r in trials) == 1  # best quality and speed: i=7


def test_a_relative_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    from automl_ad.tracking.store import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker("sqlite:///mlflow.db")
    experiment = tracker.client.get_experiment(tracker.experiment("relative"))
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "relative").as_uri()


def test_search_without_data_uses_the_last_recommendation(tmp_path, monkeypatch):
    from automl_ad.cli import main
    from automl_ad.data.demo import generate_demo
    from automl_ad.search.plan import plan_search

    data = generate_demo(tmp_path / "d", categories=["texture"], n_train=12, n_test_good=3, n_test_per_defect=1,
                         size=64)["texture"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOML_AD_OFFLINE", "1")  # no hub: backbone families run on the built-in weights only
    assert main(["recommend", str(data), "--json"]) == 0
    messages = []
    request = plan_search(None, say=messages.append, budget_s=60)
    assert request.data == str(data.resolve()) and "last `automl-ad recommend`" in messages[0]
    assert request.families and request.budget_s == 60
    from automl_ad.defaults import BUILTIN_BACKBONE
    from automl_ad.detectors import detector_class
    from automl_ad.detectors.feature_based import BackboneDetector

    assert not request.backbone_weights
    backbone_families = [f for f in request.families if issubclass(detector_class(f), BackboneDetector)]
    assert backbone_families, "offline, the built-in backbone keeps the backbone families in the search"
    assert all(request.backbones[f] == [BUILTIN_BACKBONE] for f in backbone_families)
    notes = [m for m in messages if "built into automl-ad" in m]
    assert len(notes) == 1 and all(f in notes[0] for f in backbone_families)  # one note names every family
    assert request.limits == {}  # the default profile states no deployment limits
    edge = plan_search(None, profile="edge-cpu", say=messages.append, budget_s=60)
    assert edge.limits == {"latency_ms": 20.0, "model_mb": 50.0}  # 40 fps is 25 ms: the 20 ms budget is tighter


def _stpm_trial(tmp_path, mvtec_dir, **spec) -> dict:
    """A search trial of STPM (its test parameters with ``spec["params"]`` over them) on the tiny MVTec folder:
    train on its normal images, validate on all."""
    import json

    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.search.trial import run_trial

    data = open_dataset(mvtec_dir)
    train = ImageSet.from_records(data.normal, data)
    validation = ImageSet.from_records(data.records, data)
    (tmp_path / "data.json").write_text(json.dumps({"train": train.to_json(), "validation": validation.to_json()}))
    params = {**create_detector("stpm").test_params, **spec.pop("params")}
    return run_trial({"family": "stpm", "params": params, "data_file": str(tmp_path / "data.json"),
                      "out_dir": str(tmp_path / "trial"), **spec})


def test_iterative_trial_out_of_training_time_is_evaluated_not_failed(tmp_path, mvtec_dir):
    """An iterative family stops training at its share of the trial limit and reports what it learnt."""
    result = _stpm_trial(tmp_path, mvtec_dir, params={"epochs": 100_000}, timeout_s=20)
    assert result["training_cut_by_time"] is True
    assert 1 <= result["epochs_trained"] < 100_000
    assert np.isfinite(result["quality"])


def test_a_trial_does_not_score_its_last_epoch_before_its_final_evaluation(tmp_path, mvtec_dir, capsys):
    """The final evaluation follows the last epoch: an interim score there would do the same work twice (a CutPaste
    default re-estimated its Gaussian and scored the validation images twice, and timed out)."""
    import json

    result = _stpm_trial(tmp_path, mvtec_dir, params={"epochs": 3}, report_every=1)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [("quality" in e) for e in events if e["event"] == "epoch"] == [True, True, False]
    assert result["epochs_trained"] == 3 and np.isfinite(result["quality"])


def test_a_screening_trial_is_ranked_on_part_of_the_validation(tmp_path, mvtec_dir, monkeypatch):
    """A fidelity with ``validation_images`` scores only the screening subset, and says how many it was ranked
    on (the validation's resolution)."""
    monkeypatch.setattr("automl_ad.search.validation.SEARCH_MIN_SCREEN_VALIDATION", 2)
    (tmp_path / "full").mkdir(), (tmp_path / "screened").mkdir()
    full = _stpm_trial(tmp_path / "full", mvtec_dir, params={"epochs": 1})
    fidelity = {"rung": 1, "train_fraction": 1 / 3, "train_images": 4, "validation_images": 4}
    screened = _stpm_trial(tmp_path / "screened", mvtec_dir, params={"epochs": 1}, fidelity=fidelity)
    assert screened["train_images"] == 4
    assert 2 <= screened["val_normal_images"] < full["val_normal_images"]
    assert screened["val_anomalous_images"] == full["val_anomalous_images"] == 2  # at least 2: all of them


def test_a_trial_reports_its_network_set_up_apart_from_its_work(tmp_path, mvtec_dir):
    """Set-up seconds (building networks, exporting graphs, opening sessions) are part of the fit and of what
    follows it, and reported apart so that the cost predictor does not scale them with the images; so is the
    fit's scoring of the validation between epochs (here after epochs 1 and 2 of 3)."""
    result = _stpm_trial(tmp_path, mvtec_dir, params={"epochs": 3}, report_every=1)
    assert 0 <= result["fit_setup_seconds"] <= result["fit_seconds"] + 0.5  # the detector is built just before
    assert 0 < result["interim_scoring_seconds"] < result["fit_seconds"]
    assert 0 < result["post_fit_setup_seconds"] <= result["post_fit_seconds"]  # the scoring graph is exported
    assert result["fit_cache_saved_seconds"] >= 0 and result["post_fit_cache_saved_seconds"] >= 0


def test_gpu_search_space_has_no_int8():
    from automl_ad.search.space import load_space

    cpu = load_space("patchcore")
    assert "int8" in next(p.choices for p in cpu.parameters if p.name == "precision")
    gpu = cpu.for_gpu()
    assert next(p.choices for p in gpu.parameters if p.name == "precision") == ("fp32",)
    assert [p.name for p in gpu.parameters] == [p.name for p in cpu.parameters]


def test_a_model_the_synthetic_comparison_cannot_score_is_named_and_left_out(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from automl_ad.search import engine

    runs = [SimpleNamespace(data=SimpleNamespace(metrics={"quality": 0.9}, tags={"trial": name}),
                            info=SimpleNamespace(run_id=f"run-{name}")) for name in ("good", "broken")]
    for name in ("good", "broken"):
        (tmp_path / "trials" / name / "model").mkdir(parents=True)
    logged, said = {}, []
    tracker = SimpleNamespace(trials=lambda parent: runs, log_metrics=lambda run_id, m: logged.update({run_id: m}))

    def comparison(model_dir, reference, metric, far):
        if "broken" in str(model_dir):
            raise RuntimeError("Unexpected key(s) in state_dict")
        return {"synthetic_quality": 0.8}

    monkeypatch.setattr("automl_ad.search.validation.synthetic_comparison", comparison)
    request = SimpleNamespace(metric="combined", false_alarm_rate=0.01)
    engine._compare_on_synthetic(tracker, "parent", tmp_path, [0] * 5, request, said.append)
    assert logged == {"run-good": {"synthetic_quality": 0.8}}
    assert "trial broken (RuntimeError: Unexpected key(s) in state_dict)" in said[-1]
