"""Label-free selection that does not flatter self-supervised families, and the deployable operating point:
detection_at_far, synthetic-vs-real agreement, per-family held-out synthetic kinds, and how reports show them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automl_ad.defaults import QUALITY_METRICS
from automl_ad.deploy.thresholds import operating_points
from automl_ad.evaluation.metrics import detection_at_far, evaluate, smallest_far, threshold_at_far
from automl_ad.evaluation.selection import selection_agreement
from automl_ad.search.validation import quality


# --- detection at a target false-alarm rate -------------------------------------------------------------------------
def test_detection_at_far_on_hand_made_scores():
    normal = np.round(np.arange(1, 11) / 10, 2)  # 0.1 .. 1.0
    defects = np.array([0.5, 0.95, 1.2, 0.91])
    labels, scores = np.r_[np.zeros(10, int), np.ones(4, int)], np.r_[normal, defects]
    # threshold = the ceil(11 * 0.9) = 10th smallest normal = 1.0 (a new normal exceeds it with probability 1/11);
    # a defect must score above it
    assert threshold_at_far(normal, 0.1) == pytest.approx(1.0)
    assert detection_at_far(labels, scores, far=0.1) == pytest.approx(0.25)  # 1.2 only
    assert detection_at_far(labels, scores, far=0.5) == pytest.approx(0.75)  # ceil(5.5) = 6th: 0.6
    assert threshold_at_far(normal, 0.3) == pytest.approx(0.8)  # ceil(7.7) = 8th
    assert detection_at_far(labels, -scores, far=0.1) == 0.0
    # one implementation: the export's threshold table says the same
    table = {row["target_false_alarm_rate"]: row for row in operating_points(normal, defects, rates=(0.1, 0.5))}
    assert table[0.1]["detection_rate"] == pytest.approx(0.25) and table[0.5]["detection_rate"] == pytest.approx(0.75)
    assert table[0.1]["threshold"] == pytest.approx(1.0) and table[0.1]["false_alarm_rate"] == 0.0


def test_threshold_at_far_keeps_its_promise_on_new_normal_images():
    """Split-conformal: over many draws, the share of new normal images above the threshold is at most the target
    (where n allows it); with too few normals it is the largest score, exceeded by about 1 / (n + 1)."""
    rng = np.random.default_rng(0)
    for n, far in ((50, 0.1), (200, 0.01), (1000, 0.05)):
        achieved = [(rng.normal(size=20000) > threshold_at_far(rng.normal(size=n), far)).mean() for _ in range(200)]
        assert np.mean(achieved) <= far + 0.002 and np.mean(achieved) >= far / 2, (n, far, np.mean(achieved))
    few = [(rng.normal(size=20000) > threshold_at_far(rng.normal(size=5), 0.01)).mean() for _ in range(400)]
    assert abs(np.mean(few) - smallest_far(5)) < 0.02


def test_detection_at_far_is_none_without_both_classes_and_refuses_bad_rates():
    assert detection_at_far([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert detection_at_far([1, 1], [0.1, 0.2]) is None
    for far in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="false-alarm rate"):
            detection_at_far([0, 1], [0.1, 0.2], far=far)


def test_detection_at_far_is_a_validation_metric_and_a_quality():
    labels, scores = np.r_[np.zeros(200, int), np.ones(10, int)], np.r_[np.linspace(0, 1, 200), np.full(10, 0.997)]
    metrics = evaluate(labels, scores)
    assert metrics["detection_at_far"] == 1.0  # 0.997 is above the ceil(201 * 0.99) = 199th normal (0.99497)
    assert evaluate(labels, scores, far=0.001)["detection_at_far"] == 0.0  # too few normals for 0.001: the largest
    assert "detection_at_far" in QUALITY_METRICS
    assert quality(metrics, "detection_at_far") == 1.0


# --- synthetic-vs-real agreement --------------------------------------------------------------------------------------
def test_selection_agreement_on_hand_made_qualities():
    same = selection_agreement([0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2])
    assert same.n_trials == 4 and same.spearman == pytest.approx(1.0) and same.regret == 0.0
    # the fabric of issue 11: CutPaste first on synthetic anomalies, PatchCore first on the real defects
    fabric = selection_agreement([0.984, 0.750, 0.90, 0.80], [0.75, 0.983, 0.90, 0.85])
    assert fabric.regret == pytest.approx(0.983 - 0.75)
    assert fabric.spearman == pytest.approx(-0.8)  # ranks (4, 1, 3, 2) vs (1, 4, 3, 2): 1 - 6 * 18 / (4 * 15)


def test_selection_agreement_ties_and_small_samples():
    tied = selection_agreement([0.9, 0.9, 0.5], [0.6, 0.8, 1.0])
    assert tied.regret == pytest.approx(1.0 - 0.7)  # a coin toss between the two tied for first: mean real 0.7
    # average ranks (2.5, 2.5, 1) against (1, 2, 3): Pearson of the ranks = -1.5 / sqrt(1.5 * 2)
    assert tied.spearman == pytest.approx(-1.5 / np.sqrt(3))
    two = selection_agreement([0.9, 0.5], [0.4, 0.8])
    assert two.spearman is None and two.regret == pytest.approx(0.4)  # no correlation from two trials
    assert selection_agreement([0.7], [0.3]).regret == 0.0
    assert selection_agreement([], []).spearman is None and selection_agreement([], []).regret is None
    constant = selection_agreement([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    assert constant.spearman is None and constant.regret == pytest.approx(0.3 - 0.2)


def test_selection_agreement_refuses_mismatched_or_missing_numbers():
    with pytest.raises(ValueError, match="one synthetic and one real"):
        selection_agreement([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="finite"):
        selection_agreement([0.1, float("nan"), 0.3], [0.3, 0.2, 0.1])


# --- per-family held-out synthetic kinds ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_texture(tmp_path_factory):
    """A small demo texture: 30 train normals (6 held out for validation), labelled defects for test/reference."""
    from automl_ad.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo"), categories=["texture"], n_train=30, n_test_good=4,
                         n_test_per_defect=2, size=48)["texture"]


def _kinds(images) -> dict:
    counts = {}
    for kind, label in zip(images.kinds, images.labels):
        key = kind or ("normal" if label == 0 else "real")
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_families_declare_the_synthetic_kinds_they_train_on():
    from automl_ad.data.synthetic import KINDS
    from automl_ad.detectors import detector_class, list_detectors

    declared = {name: detector_class(name).trains_on_anomalies for name in list_detectors()}
    assert declared["cutpaste"] == ("cutpaste", "scar")
    # SimpleNet's anomalies are Gaussian noise on features and diffusion's noise is the denoising target: no image
    # kind; every other family trains on normal images only
    assert all(kinds == () for name, kinds in declared.items() if name != "cutpaste")
    assert all(set(kinds) <= set(KINDS) for kinds in declared.values())


def test_each_family_is_ranked_without_the_kinds_it_trains_on_and_as_many_anomalies_as_before(demo_texture, tmp_path):
    from automl_ad.data import open_dataset
    from automl_ad.data.split import SearchSplit
    from automl_ad.search.validation import prepare_search_data

    dataset = open_dataset(demo_texture)
    split = prepare_search_data(dataset, tmp_path, "synthetic", families=["cutpaste", "padim"])
    n_normal = int((split.validation.labels == 0).sum())
    assert n_normal == 8 and split.reference is not None  # 6 training normals held out, 2 borrowed from test
    # three rounds: every kind on every held-out normal image
    assert _kinds(split.validation) == {"normal": 8, "cutpaste": 8, "scar": 8, "perlin": 8}
    cutpaste = split.validation_for(("cutpaste", "scar"))
    assert _kinds(cutpaste) == {"normal": 8, "perlin": 8}  # never its own training kinds, as many as before
    padim = split.validation_for(())
    assert _kinds(padim) == {"normal": 8, "cutpaste": 3, "scar": 3, "perlin": 2}  # one per normal, kinds in turn
    assert _kinds(split.validation_for(("scar",))) == {"normal": 8, "cutpaste": 4, "perlin": 4}
    assert len({p.name for p in cutpaste.paths}) == len(cutpaste)
    # the kinds travel with the split a search logs, and the trial's data file
    again = SearchSplit.from_json(split.to_json())
    assert again.validation.kinds == split.validation.kinds
    assert again.validation_for(("cutpaste", "scar")).paths == cutpaste.paths
    assert "each family is ranked on 8 of kinds it does not train on" in split.describe()


def test_synthesis_makes_only_the_rounds_the_families_need_and_is_deterministic(demo_texture, tmp_path):
    from automl_ad.data import open_dataset
    from automl_ad.search.validation import prepare_search_data

    dataset = open_dataset(demo_texture)
    one = prepare_search_data(dataset, tmp_path / "a", "synthetic", families=["padim", "gaussian"])
    assert _kinds(one.validation) == {"normal": 8, "cutpaste": 3, "scar": 3, "perlin": 2}
    written = {p: p.read_bytes() for p in one.validation.paths[8:]}
    stamps = {p: p.stat().st_mtime_ns for p in written}
    full = prepare_search_data(dataset, tmp_path / "a", "synthetic", families=["cutpaste"])  # more rounds
    assert len(full.validation) == 8 + 24
    assert all(p.stat().st_mtime_ns == stamps[p] for p in written)  # the first round was reused, not rewritten
    elsewhere = prepare_search_data(dataset, tmp_path / "b", "synthetic")  # all rounds at once, another folder
    assert [p.name for p in elsewhere.validation.paths] == [p.name for p in full.validation.paths]
    assert all((tmp_path / "b" / "synthetic-validation" / p.name).read_bytes() == data for p, data in written.items())
    real = prepare_search_data(dataset, tmp_path / "c", "real")  # labelled defects: nothing is synthesised
    assert real.validation.kinds is None and real.validation_for(("cutpaste", "scar")) is real.validation


def test_another_seed_writes_its_own_synthetic_anomalies_and_leaves_the_first_seeds(demo_texture, tmp_path):
    """Searches of one dataset share a working folder: a search with another seed must not rewrite the anomalies an
    earlier search was ranked on (its export calibrates and states rates on them)."""
    from automl_ad.data import open_dataset
    from automl_ad.search.validation import prepare_search_data

    dataset = open_dataset(demo_texture)
    first = prepare_search_data(dataset, tmp_path, "synthetic", seed=0)
    written = {p: p.read_bytes() for p in first.validation.paths if "synthetic-validation" in str(p)}
    other = prepare_search_data(dataset, tmp_path, "synthetic", seed=1)
    assert written and all(p.read_bytes() == data for p, data in written.items())
    assert {Path(p).parent.name for p in other.validation.paths if "synthetic" in str(p)} == \
        {"synthetic-validation-seed1"}


def test_rounds_and_a_family_that_trains_on_every_kind():
    from automl_ad.data.imageset import ImageSet
    from automl_ad.data.synthetic import KINDS, rounds_needed, without_trained_kinds

    assert rounds_needed([()]) == 1 and rounds_needed([]) == 1
    assert rounds_needed([(), ("scar",)]) == 2
    assert rounds_needed([("cutpaste", "scar"), ()]) == 3
    assert rounds_needed([KINDS]) == 3
    images = ImageSet(paths=["n.png", "a.png", "b.png"], labels=[0, 1, 1], kinds=[None, "cutpaste", "scar"])
    with pytest.raises(ValueError, match="rank it on labelled defects"):
        without_trained_kinds(images, ("cutpaste", "scar"))
    with pytest.raises(ValueError, match="one entry"):
        ImageSet(paths=["n.png"], labels=[0], kinds=[None, "scar"])


@pytest.mark.parametrize("family, used", [("cutpaste", {"cutpaste": 0, "scar": 0, "perlin": 8}),
                                          ("gaussian", {"cutpaste": 3, "scar": 3, "perlin": 2})])
def test_a_trial_is_scored_only_on_kinds_its_family_does_not_train_on(demo_texture, tmp_path, family, used):
    import json

    from automl_ad.data import open_dataset
    from automl_ad.detectors import detector_class
    from automl_ad.search.trial import run_trial
    from automl_ad.search.validation import prepare_search_data

    split = prepare_search_data(open_dataset(demo_texture), tmp_path, "synthetic", families=["cutpaste", "gaussian"])
    (tmp_path / "split.json").write_text(json.dumps(split.to_json()))
    result = run_trial({"family": family, "params": detector_class(family).test_params,
                        "data_file": str(tmp_path / "split.json"), "out_dir": str(tmp_path / "trial"),
                        "latency_repeats": 1})
    assert {kind: result[f"val_anomalies_{kind}"] for kind in used} == used
    assert np.isfinite(result["quality"]) and result["real_quality"] is not None  # real defects scored too
    assert 0 <= result["val_detection_at_far"] <= 1


# --- what people are shown -------------------------------------------------------------------------------------------
def _facts(trials):
    from automl_ad.reporting.html_report import SearchFacts
    from automl_ad.tracking.records import SearchRecord

    search = SearchRecord(run_id="r" * 32, experiment="fabric", data="/data/fabric", seed=0, metric="combined",
                          validation_kind="synthetic", families=["cutpaste", "patchcore"], work_dir=None,
                          fingerprint="f", dataset_name="fabric", start_time=0,
                          params={"metric": "combined", "validation": "synthetic", "budget_s": "900.0"})
    return SearchFacts(search, trials, None, "no profile", None, None)


def _trial(trial, family, quality, real, **extra):
    return {"run_id": trial * 8, "trial": trial, "family": family, "status": "ok", "pareto_rank": 0, "params": {},
            "quality": quality, "real_quality": real, "throughput": 123.456789, "memory_mb": 1234.5678,
            "fit_seconds": 312.25, "error": None, **extra}


def test_report_trials_section_states_agreement_kinds_and_rounded_figures():
    from automl_ad.reporting.html_report import trials_section

    trials = [_trial("t1", "cutpaste", 0.9775691184141888, 0.75, val_anomalies_cutpaste=0.0, val_anomalies_scar=0.0,
                     val_anomalies_perlin=6.0),
              _trial("t2", "patchcore", 0.750, 0.983, val_anomalies_cutpaste=2.0, val_anomalies_scar=2.0,
                     val_anomalies_perlin=2.0),
              _trial("t3", "padim", 0.85, 0.9, val_anomalies_cutpaste=2.0, val_anomalies_scar=2.0,
                     val_anomalies_perlin=2.0),
              {"run_id": "x" * 32, "trial": "t4", "family": "stpm", "status": "failed", "params": {},
               "failure_reason": "timeout", "error": None}]
    text = trials_section(_facts(trials))
    assert "0.978" in text and "0.9775" not in text  # qualities to three decimals
    assert "123.5" in text and "1235" in text and "5 min 12 s" in text  # img/s, MB, fit time in sensible units
    assert "real quality" in text and "0.983" in text
    assert "Spearman rank correlation of synthetic and real quality -1.000" in text  # ranks (3, 1, 2), (1, 3, 2)
    assert "regret of choosing on synthetic anomalies 0.233" in text
    assert "cutpaste: perlin" in text and "patchcore: cutpaste, perlin, scar" in text
    # without real defects neither the column nor the agreement line appears
    plain = trials_section(_facts([{**t, "real_quality": None} for t in trials[:3]]))
    assert "real quality" not in plain and "Spearman" not in plain


def test_report_draws_the_operating_curve_with_the_calibrated_threshold():
    import re

    from automl_ad.deploy.thresholds import operating_points
    from automl_ad.reporting.html_report import Evaluation, operating_section

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(10, int)]
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(2.5, 1, 10)]
    validation_normal, validation_defects = rng.normal(0, 1, 30), rng.normal(2, 1, 12)
    threshold = {"value": 2.3263478740408408, "method": "evt", "target_false_alarm_rate": 0.01, "n_normal": 30,
                 "note": ""}
    ev = Evaluation(None, "r" * 32, "patchcore", threshold, labels=labels, scores=scores, n_test=50,
                    operating_points=operating_points(validation_normal, validation_defects),
                    validation_rates={"false_alarm_rate": 0.0, "detection_rate": 0.4166666666666667},
                    validation_kind="synthetic")
    text = operating_section(ev)
    assert "alt='operating curve' src='data:image/png;base64," in text
    assert "2.326 (evt)" in text and "0.417" in text and "0.4166" not in text
    assert not re.search(r"\d\.\d{5,}", text.split("base64,")[0] + text.split("'>", 1)[1])  # no long decimals
    assert text.count("<tr") == 1 + 7 + 1  # header, the package's threshold table, the calibrated threshold
    missing = operating_section(Evaluation("The dataset /gone is not on this machine."))
    assert "/gone is not on this machine" in missing and "base64" not in missing


def test_rounding_for_people_and_the_cli_leaderboard():
    import io

    from rich.console import Console

    from automl_ad.cli import _print_leaderboard
    from automl_ad.reporting.rounding import duration, rounded

    assert rounded(0.9775691184141888) == "0.978" and rounded(1) == "1.000" and rounded(12.345, 1) == "12.3"
    assert rounded(None) == "n/a" and rounded(float("nan")) == "n/a"
    assert [duration(s) for s in (0.42, 12.34, 59.96, 245, 7620)] == ["420 ms", "12.3 s", "1 min 00 s",
                                                                       "4 min 05 s", "2 h 07 min"]
    assert duration(None) == "n/a"
    buffer = io.StringIO()
    _print_leaderboard(Console(file=buffer, width=200), [_trial("t1", "cutpaste", 0.9775691184141888, None,
                                                                latency_ms_p50=3.14159)])
    table = buffer.getvalue()
    assert "0.978" in table and "123.5" in table and "1235" in table and "3.1" in table and "5 min 12 s" in table
    assert "0.9775" not in table and "3.1415" not in table


def test_too_few_real_defects_are_ranked_on_beside_synthetic_anomalies(demo_texture, tmp_path, monkeypatch):
    """A handful of labelled defects moves an AUROC in steps too coarse to rank trials (60 good and 3 defective
    bottles: 2 validation defects, "resolves about ±0.10"): below ``MIN_REAL_VALIDATION_DEFECTS`` they are ranked on
    beside synthetic anomalies, which a family never trains on; with enough of them, on them alone."""
    from automl_ad.data import open_dataset
    from automl_ad.data.split import SearchSplit
    from automl_ad.defaults import MIN_REAL_VALIDATION_DEFECTS
    from automl_ad.search import validation
    from automl_ad.search.validation import prepare_search_data

    dataset = open_dataset(demo_texture)
    split = prepare_search_data(dataset, tmp_path, "auto", families=["cutpaste", "padim"])
    real = _kinds(split.validation).get("real", 0)
    assert 0 < real < MIN_REAL_VALIDATION_DEFECTS and split.validation_kind == "mixed"
    assert _kinds(split.validation) == {"normal": 8, "cutpaste": 8, "scar": 8, "perlin": 8, "real": real}
    assert _kinds(split.validation_for(("cutpaste", "scar"))) == {"normal": 8, "perlin": 8, "real": real}
    assert f"{real} real defects (too few to rank on alone) and 24 synthetic anomalies" in split.describe()
    again = SearchSplit.from_json(split.to_json())
    assert again.validation_kind == "mixed" and again.validation.kinds == split.validation.kinds
    assert again.validation.masks()[-1] is not None  # the real defects keep their masks
    monkeypatch.setattr(validation, "MIN_REAL_VALIDATION_DEFECTS", real)
    alone = prepare_search_data(dataset, tmp_path, "auto", families=["cutpaste", "padim"])
    assert alone.validation_kind == "real" and alone.validation.kinds is None
    assert list(alone.validation.labels).count(1) == real and len(alone.validation) == 8 + real


@pytest.mark.parametrize("count, tested", [(30, 0), (110, 22)])
def test_a_few_normals_without_defects_train_instead_of_making_a_test_split(tmp_path, count, tested):
    """Without labelled defects a test split could only count false alarms: on fewer normals than
    ``MIN_TEST_NORMALS`` too coarsely to be worth what they add to training (30 images: 18 trained, not 24)."""
    from PIL import Image

    from automl_ad.data import open_dataset
    from automl_ad.search.validation import prepare_search_data

    rng = np.random.default_rng(0)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(90, 110, (32, 32), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    split = prepare_search_data(open_dataset(folder), tmp_path / "work", "auto", families=["padim"])
    held_out = round(count * 0.2)
    assert len(split.test) == tested and split.validation_kind == "synthetic"
    assert len(split.train) == count - held_out - tested and int((split.validation.labels == 0).sum()) == held_out
