"""Budget-aware scheduling: the cost predictor, fidelities, per-family rungs, the fallback and the anytime curve."""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from automl_ad.defaults import (
    SEARCH_CONFIGS_PER_BUDGET,
    SEARCH_COST_MARGIN,
    SEARCH_END_TAIL_S,
    SEARCH_LIMIT_SLACK_S,
    SEARCH_TRAINING_SHARE,
    SEARCH_TRIAL_OVERHEAD_S,
    SEARCH_UNMEASURED_COST_MARGIN,
)
from automl_ad.search.cost_predictor import (
    CostPredictor,
    FamilyTraits,
    Fidelity,
    TrialSizes,
    TrialTimes,
    Work,
    network_pixels,
    plan_trial,
    rungs,
)
from automl_ad.search.proposer import Proposer
from automl_ad.search.ray_runtime import RAY_CLUSTER_MODE_ENV, family_scheduler, resource
from automl_ad.search.request import SearchRequest
from automl_ad.search.space import load_space, proposed_geometries

# the scheduler test imports Ray; a local Ray must then still listen on 127.0.0.1 only (as start_ray arranges)
os.environ.setdefault(RAY_CLUSTER_MODE_ENV, "0")

TRAITS = {"stpm": FamilyTraits("teacher_student", True), "padim": FamilyTraits("distribution_map", False),
          "gaussian": FamilyTraits("statistical", False)}


def _true_seconds(work: Work) -> tuple[float, float]:
    """A synthetic machine: fit and total seconds of ``work`` (0.4 s per fit unit, 0.1 s per eval unit)."""
    fit = 0.4 * work.fit_units
    return fit, fit + 0.1 * work.eval_units + 12.0


def test_cost_predictor_learns_from_measurements_within_a_factor():
    predictor = CostPredictor(TRAITS)
    rng = np.random.default_rng(0)
    works = [Work("stpm", int(rng.integers(20, 400)), int(rng.integers(10, 100)), float(rng.integers(128, 512)) ** 2,
                  int(rng.integers(2, 40))) for _ in range(12)]
    prior = predictor.predict(works[0], {"backbone": "resnet18"})
    assert prior.basis == "cost model" and prior.total_s > 0
    for work in works[:3]:
        fit, wall = _true_seconds(work)
        predictor.observe(work, TrialTimes(fit, wall), {"backbone": "resnet18"})
    assert predictor.measured("stpm") == 3
    for work in works[3:]:
        predicted, (_, wall) = predictor.predict(work).total_s, _true_seconds(work)
        assert wall / 1.5 <= predicted <= wall * 1.5, (work, predicted, wall)


def test_unmeasured_family_uses_the_machine_speed_for_fitting_and_the_measured_evaluation_rate():
    """Fitting differs from the cost model by the machine's factor; evaluation (decoding, metrics on every
    validation image, saving) costs what it cost the measured families per image and pixel, whatever the family."""
    predictor = CostPredictor(TRAITS)
    work = Work("padim", 100, 20, 256 ** 2, None)
    before = predictor.predict(work, {"backbone": "resnet18"})
    stpm = Work("stpm", 100, 40, 128 ** 2, 1)  # one epoch: no interim scoring in its fit
    model = predictor.predict(stpm, {"backbone": "resnet18"})
    fit, evaluation = 5 * model.fit_s, 3 * model.eval_s  # this machine fits 5x slower than modelled
    predictor.observe(stpm, TrialTimes(fit, fit + evaluation + model.overhead_s, eval_s=evaluation),
                      {"backbone": "resnet18"})
    after = predictor.predict(work, {"backbone": "resnet18"})
    assert after.fit_s == pytest.approx(5 * before.fit_s)
    assert after.eval_s == pytest.approx(evaluation / stpm.eval_units * work.eval_units)
    assert "machine speed 5 (fit); evaluation as measured on other families" in after.basis


def test_a_family_measured_many_times_does_not_speak_for_the_machine():
    """Three trials of a family the cost model misjudges 6x, one each of two it judges within 1.5x and 2x: the
    machine speed is the median of the three families (2x), not of the five trials (6x)."""
    traits = {**TRAITS, "template": FamilyTraits("template_matching", False)}
    predictor = CostPredictor(traits)
    for family, factor, count in (("template", 6.0, 3), ("stpm", 1.5, 1), ("gaussian", 2.0, 1)):
        work = Work(family, 100, 20, 256 ** 2, 2 if family == "stpm" else None)
        model = CostPredictor(traits).predict(work, {"backbone": "resnet18"})  # the cost model's own seconds
        for _ in range(count):
            predictor.observe(work, TrialTimes(factor * model.fit_s, factor * model.fit_s + 5.0 + model.overhead_s,
                                               eval_s=5.0), {"backbone": "resnet18"})
    padim = Work("padim", 100, 20, 256 ** 2, None)
    prior = CostPredictor(traits).predict(padim, {"backbone": "resnet18"})
    assert predictor.predict(padim, {"backbone": "resnet18"}).fit_s == pytest.approx(2.0 * prior.fit_s)


def test_measured_seconds_after_the_fit_replace_the_overhead_prior():
    """A trial reports its seconds after the fit: evaluation is learnt from them (not from the wall time less an
    assumed overhead), and the rest of its wall time is the trial process's measured overhead."""
    predictor = CostPredictor(TRAITS)
    work = Work("padim", 100, 20, 256 ** 2, None)
    assert predictor.overhead_s() == SEARCH_TRIAL_OVERHEAD_S
    predictor.observe(work, TrialTimes(10.0, 10.0 + 3.0 + 6.0, eval_s=3.0), {"backbone": "resnet18"})
    assert predictor.overhead_s() == pytest.approx(6.0)
    again = predictor.predict(work, {"backbone": "resnet18"})
    assert (again.fit_s, again.eval_s, again.overhead_s) == pytest.approx((10.0, 3.0, 6.0))
    other = predictor.predict(Work("stpm", 100, 20, 256 ** 2, 5), {"backbone": "resnet18"})
    assert other.overhead_s == pytest.approx(6.0)  # the overhead is the process's, whatever the family


def test_set_up_seconds_are_not_scaled_with_the_work_and_cached_features_count_as_work():
    """A small squash trial spends most of its fit building the network: only the rest scales with the pixels of a
    tiled configuration (scaled whole, a tiled PaDiM on ball_screw was predicted 445 s and took 52). After the fit,
    running the network grows with the pixels, metrics and saving with the validation images only. Features the
    cache spared a trial are work a later one may have to do."""
    predictor = CostPredictor(TRAITS)
    squash = Work("padim", 50, 100, 256 ** 2, None)
    predictor.observe(squash, TrialTimes(4.0, 12.0, eval_s=5.0, fit_setup_s=3.0, eval_setup_s=1.0, eval_network_s=3.0,
                                         eval_cached_s=2.0), {"backbone": "resnet18"})
    tiled = Work("padim", 50, 100, 11 * 256 ** 2, None)
    prediction = predictor.predict(tiled, {"backbone": "resnet18"})
    assert prediction.fit_s == pytest.approx(3.0 + 11 * 1.0) and prediction.fit_setup_s == pytest.approx(3.0)
    network, metrics = 3.0 + 2.0, 5.0 - 1.0 - 3.0  # 2 s of the network's work came from the cache
    assert prediction.eval_s == pytest.approx(1.0 + 11 * network + metrics)
    more = predictor.predict(Work("padim", 50, 300, 256 ** 2, None), {"backbone": "resnet18"})
    assert more.eval_s == pytest.approx(1.0 + 3 * (network + metrics))
    other = predictor.predict(Work("stpm", 50, 100, 256 ** 2, 1), {"backbone": "resnet18"})
    assert other.fit_setup_s == pytest.approx(3.0)  # an unmeasured family: the set-up measured on the others


def test_an_iterative_fit_is_set_up_epochs_and_interim_scoring():
    """10 epochs: 10 s of set-up (paid once when the epochs are cut), 2 s per epoch, and the validation scored
    after epochs 2, 4, 6 and 8 (5 s each, like the final evaluation; not after the last)."""
    predictor = CostPredictor(TRAITS)
    work = Work("stpm", 100, 20, 256 ** 2, 10)
    predictor.observe(work, TrialTimes(50.0, 60.0, eval_s=5.0, fit_setup_s=10.0, interim_s=20.0),
                      {"backbone": "resnet18"})
    assert predictor.predict(work).fit_s == pytest.approx(50.0)
    assert predictor.predict(Work("stpm", 100, 20, 256 ** 2, 21)).fit_s == pytest.approx(10.0 + 42.0 + 10 * 5.0)
    sizes = TrialSizes(100, 20, (256, 256))
    plan = plan_trial(predictor, sizes, "stpm", {"epochs": 10, "backbone": "resnet18"}, math.inf,
                      within_s=(10.0 + 4.0 * 5.5) / SEARCH_TRAINING_SHARE)  # set-up and 5.5 epochs (interim averaged)
    assert plan.skip is None and plan.fidelity.rung == 0 and plan.fidelity.epochs == 5


def test_a_timeout_raises_the_family_prediction_above_what_it_ran_out_of():
    predictor = CostPredictor(TRAITS)
    work = Work("padim", 100, 20, 256 ** 2, None)
    predictor.observe_timeout(work, 300.0)
    assert predictor.predict(work).total_s >= SEARCH_COST_MARGIN * 300.0 * 0.99


def test_network_pixels_follow_input_size_and_tiles():
    assert network_pixels({"input_size": 224}, (1000, 2000)) == 224 ** 2
    assert network_pixels({}, (100, 300)) == 100 * 300
    tiled = {"mode": "tile", "height": 256, "width": 256, "scale": 1.0, "overlap": 0, "pad": "reflect"}
    assert network_pixels({"input_size": 256, "geometry": tiled}, (512, 1024)) == 8 * 256 ** 2


def test_trial_sizes_tile_each_sampled_image_not_their_mean():
    """One 1540x645 image in eight 1130x460 ones: the mean image is two 480-px tile rows high, but seven of the
    eight images need one row of three tiles (the other two rows of four)."""
    tiled = {"geometry": {"mode": "tile", "height": 480, "width": 512, "scale": 1.0, "overlap": 64,
                          "pad": "reflect"}}
    sampled = ((460, 1130),) * 7 + ((645, 1540),)
    mean_hw = tuple(float(np.mean([hw[i] for hw in sampled])) for i in (0, 1))
    sizes = TrialSizes(100, 20, mean_hw, sampled_hw=sampled)
    tile = 480 * 512
    assert network_pixels(tiled, mean_hw) == 6 * tile  # what the mean alone said
    assert sizes.network_pixels(tiled) == pytest.approx((7 * 3 + 8) / 8 * tile)
    assert TrialSizes(100, 20, (460, 1130)).network_pixels(tiled) == 3 * tile


def _slow_predictor(seconds_per_unit: float) -> CostPredictor:
    predictor = CostPredictor(TRAITS)
    for family in TRAITS:
        work = Work(family, 90, 30, 256 ** 2, 10 if TRAITS[family].iterative else None)
        predictor.observe(work, TrialTimes(seconds_per_unit * work.fit_units, seconds_per_unit * work.fit_units + 20.0))
    return predictor


def test_cutpaste_trials_are_costed_by_the_patches_their_network_runs():
    """CutPaste runs every patch through its network: measured at its default stride (16: 225 patches of 32 px on
    256 px), a stride-8 configuration (841 patches) is predicted 3.7x the evaluation, not the same (a 3-minute
    search planned one from its default's time and it was killed at its limit)."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.search.proposer import family_traits, trial_sizes

    image = np.zeros((256, 256, 3), np.uint8)
    data = SimpleNamespace(train=ImageSet.from_arrays([image] * 40), validation=ImageSet.from_arrays([image] * 20))
    sizes = trial_sizes(data, ["cutpaste", "padim"])
    predictor = CostPredictor(family_traits(["cutpaste"]))
    fidelity = Fidelity(0, 1.0, 40, 10, 10)
    default, fine = {"input_size": 256}, {"input_size": 256, "patch_stride": 8}
    assert sizes.work("padim", fine, fidelity).pixels == 256 ** 2
    assert sizes.work("cutpaste", default, fidelity).pixels == 225 * 32 ** 2
    predictor.observe(sizes.work("cutpaste", default, fidelity), TrialTimes(60.0, 100.0, eval_s=20.0), default)
    ratio = predictor.predict(sizes.work("cutpaste", fine, fidelity), fine).eval_s / 20.0
    assert ratio == pytest.approx(841 / 225)


def test_a_trial_starts_only_if_it_fits_its_limit_when_predicted_as_far_under_as_any_before():
    """With 1.3x its prediction left, a PaDiM runs on all its images; once a trial of this search predicted from its
    family's measurements took twice its prediction (or ran out of a limit twice it), it runs at a lower fidelity
    that would still finish. A cost-model guess falling short does not count (it has its own, wider margin)."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.search.proposer import family_traits, trial_sizes

    image = np.zeros((256, 256, 3), np.uint8)
    data = SimpleNamespace(train=ImageSet.from_arrays([image] * 90), validation=ImageSet.from_arrays([image] * 20))
    sizes = trial_sizes(data, ["padim"])
    params = {"input_size": 256}

    def measured(took: float | None = None) -> CostPredictor:
        """A predictor that measured one PaDiM; ``took``: the most a trial took over its prediction."""
        predictor = CostPredictor(family_traits(["padim"]))
        predictor.observe(sizes.work("padim", params, Fidelity(0, 1.0, 90)), TrialTimes(20.0, 40.0, eval_s=10.0),
                          params)
        if took is not None:
            predictor.observe_prediction(10.0, 10.0 * took, "measured on 2 trial(s) of padim")
        return predictor

    cap = 1.3 * plan_trial(measured(), sizes, "padim", params, 1e9).prediction.total_s
    assert plan_trial(measured(), sizes, "padim", params, cap).fidelity.rung == 0
    guessed = measured()
    guessed.observe_prediction(10.0, 20.0, "cost model")
    assert plan_trial(guessed, sizes, "padim", params, cap).fidelity.rung == 0
    for took in (1.2, 2.0, 5.0):
        chosen = plan_trial(measured(took), sizes, "padim", params, cap)
        assert (chosen.fidelity.rung == 0) == (took < 1.3) and chosen.limit_s <= cap
        assert chosen.prediction.total_s * min(took, SEARCH_COST_MARGIN) <= cap
    # an iterative family's training stops at its deadline whatever was predicted: only the seconds after it are
    # made longer, so it keeps its epochs (made longer as a whole, a 12-image STPM default trained 5 epochs, not 9)
    stpm, few = CostPredictor(family_traits(["stpm"])), TrialSizes(12, 20, (256, 256))
    stpm.observe(few.work("stpm", {}, Fidelity(0, 1.0, 12, 10, 100)), TrialTimes(30.0, 50.0, eval_s=5.0), {})
    cap = plan_trial(stpm, few, "stpm", {}, 1e9).prediction.total_s / 2
    epochs = plan_trial(stpm, few, "stpm", {}, cap).fidelity.epochs
    stpm.observe_prediction(10.0, 15.0, "measured on 1 trial(s) of stpm")
    assert stpm.under_prediction("padim") == 1.0 and stpm.under_prediction("stpm") == 1.5  # padim: unmeasured
    kept = plan_trial(stpm, few, "stpm", {}, cap)
    after_training = kept.prediction.eval_s + kept.prediction.overhead_s
    assert kept.fidelity.epochs == epochs and kept.prediction.fit_s + 1.5 * after_training <= cap
    skipped = plan_trial(stpm, few, "stpm", {}, 10.0)
    assert skipped.skip and "if it falls 1.50x short like the furthest prediction of this search" in skipped.skip


def test_template_trials_are_costed_by_the_angles_their_rotation_search_registers():
    """A rotation search registers the whole image once per angle it tries: measured without one, a +-15-degree
    search in 0.5-degree steps (61 angles, 21 tried coarse to fine) is predicted 21x the fit and the evaluation
    (predicted as one, such a trial on 96-px images at 512 px was killed at its limit)."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.search.proposer import family_traits, trial_sizes

    image = np.zeros((96, 96, 3), np.uint8)
    data = SimpleNamespace(train=ImageSet.from_arrays([image] * 10), validation=ImageSet.from_arrays([image] * 10))
    sizes = trial_sizes(data, ["template"])
    predictor = CostPredictor(family_traits(["template"]))
    fidelity = Fidelity(0, 1.0, 10)
    plain, rotating = {"input_size": 512}, {"input_size": 512, "max_rotation": 15.0}
    assert sizes.work("template", rotating, fidelity).pixels == 21 * 512 ** 2
    predictor.observe(sizes.work("template", plain, fidelity), TrialTimes(1.0, 3.0, eval_s=0.5), plain)
    prediction = predictor.predict(sizes.work("template", rotating, fidelity), rotating)
    assert prediction.fit_s == pytest.approx(21.0) and prediction.eval_s == pytest.approx(0.5 * 21)


def _proposals(proposer, qualities, study=None) -> list[dict]:
    """What ``proposer`` proposes in ``study`` (a new one by default), told each trial's quality in turn (fixed
    throughput and memory)."""
    study = study or _study()
    proposals = []
    for quality in qualities:
        trial = study.ask()
        proposals.append(proposer(trial))
        study.tell(trial, [quality, 10.0, 100.0])
    return proposals


def test_a_trial_predicted_too_slow_is_shrunk_not_started():
    predictor = _slow_predictor(2.0)  # padim: 2 s per training image-megapixel
    sizes = TrialSizes(train_images=270, validation_images=30, image_hw=(256, 256))
    params = {"input_size": 256}
    full = predictor.predict(sizes.work("padim", params, Fidelity(0, 1.0, 270)))
    cap = full.total_s / 2
    plan = plan_trial(predictor, sizes, "padim", params, cap)
    assert plan.skip is None and plan.fidelity.rung >= 1 and plan.fidelity.train_images < 270
    assert plan.prediction.total_s <= cap and plan.limit_s <= cap
    # an iterative family trains fewer epochs before it gives up images
    plan = plan_trial(predictor, sizes, "stpm", {"input_size": 256, "epochs": 50}, cap)
    assert plan.skip is None and plan.fidelity.epochs < 50
    assert plan.prediction.fit_s <= SEARCH_TRAINING_SHARE * cap
    # nothing fits: no trial, a reason
    plan = plan_trial(predictor, sizes, "padim", params, 1.0)
    assert plan.fidelity is None and "predicted" in plan.skip and "over the 1 s" in plan.skip
    assert "one epoch alone" not in plan.skip
    # not even one epoch fits: the reason says what one epoch costs (its epochs are not shrunk below one)
    plan = plan_trial(predictor, sizes, "stpm", {"input_size": 256, "epochs": 50}, 1.0)
    assert plan.fidelity is None and "50/50 epochs" in plan.skip and "(one epoch alone: " in plan.skip


def test_a_family_not_measured_yet_gets_a_wider_limit():
    """Its prediction rests on the cost model alone, which is off by more than a measured family's."""
    predictor = _slow_predictor(0.01)
    sizes = TrialSizes(90, 30, (256, 256))
    measured = plan_trial(predictor, sizes, "padim", {"input_size": 256}, 1e6)
    fresh = plan_trial(CostPredictor(TRAITS), sizes, "padim", {"input_size": 256}, 1e6)
    assert measured.limit_s == pytest.approx(SEARCH_COST_MARGIN * measured.prediction.total_s + SEARCH_LIMIT_SLACK_S)
    assert fresh.limit_s == pytest.approx(SEARCH_UNMEASURED_COST_MARGIN * fresh.prediction.total_s
                                          + SEARCH_LIMIT_SLACK_S)


def _proposer(families, predictor, sizes, seconds_left, priors=None, quick_look_s=0.0):
    """A proposer; without the quick look unless ``quick_look_s`` says how long it lasts."""
    request = SearchRequest(data=".", families=families, priors=priors or {}, budget_s=seconds_left)
    spaces = {f: load_space(f) for f in families}
    defaults = {f: {"input_size": 256} if f != "gaussian" else {} for f in families}
    defaults = {f: {**d, "epochs": 20} if TRAITS[f].iterative else d for f, d in defaults.items()}
    return Proposer(request, spaces, defaults, predictor=predictor, sizes=sizes,
                    deadline=time.monotonic() + seconds_left, quick_look_s=quick_look_s)


def _study():
    return optuna.create_study(directions=["maximize", "maximize", "minimize"])


def test_first_proposals_are_defaults_at_the_fidelity_that_fits_and_a_slow_one_is_skipped():
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(270, 30, (256, 256))
    proposer = _proposer(["padim", "gaussian"], predictor, sizes, 60.0, {"padim": 0.9, "gaussian": 0.5})
    study = _study()
    first = proposer(study.ask())  # all 270 images: predicted 55 s, over the 45 s left after the fallback reserve
    assert first["family"] == "padim" and first["default"]
    assert first["fidelity"]["rung"] >= 1 and first["predicted_s"] <= first["timeout_s"] <= 60 * 0.75 + 1
    nothing = _proposer(["padim"], predictor, sizes, 5.0)
    skipped = nothing(study.ask())
    assert "skip" in skipped and "fidelity" not in skipped


def test_after_the_first_candidates_fail_the_cheapest_fidelity_runs_next():
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(270, 30, (256, 256))
    proposer = _proposer(["stpm", "padim", "gaussian"], predictor, sizes, 600.0,
                         {"stpm": 0.9, "padim": 0.8, "gaussian": 0.1})
    study = _study()
    trial = study.ask()
    assert proposer(trial)["family"] == "stpm"
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # e.g. timed out
    fallback = proposer(study.ask())
    cheapest = min(TRAITS, key=lambda f: proposer._cheapest(f).prediction.total_s)
    assert fallback["family"] == cheapest and fallback["fidelity"]["rung"] == 2  # 270 images: 1/9 = 30 >= 8


def test_screening_trials_in_the_top_third_are_promoted():
    predictor = _slow_predictor(0.001)
    sizes = TrialSizes(270, 30, (256, 256))
    proposer = _proposer(["gaussian"], predictor, sizes, 600.0)
    study = _study()
    for q in (0.5, 0.9, 0.7):
        trial = study.ask()
        trial.set_user_attr("family", "gaussian")
        trial.set_user_attr("default", True)
        trial.set_user_attr("rung", 2)
        trial.set_user_attr("params", {"q": q})
        study.tell(trial, [q, 10.0, 100.0])
    promoted = proposer(study.ask())
    assert promoted["params"] == {"q": 0.9} and promoted["fidelity"]["rung"] == 1


def test_rungs_follow_each_family_own_schedule():
    """Resource is progress through the trial's own schedule; ASHA compares a family only with itself."""
    fastflow = {"rung": 0, "train_fraction": 1.0, "train_images": 50, "epochs": 60, "full_epochs": 60}
    stpm = {**fastflow, "epochs": 100, "full_epochs": 100}
    assert resource(fastflow, 6) == pytest.approx(10.0) and resource(stpm, 6) == pytest.approx(6.0)
    assert resource({**fastflow, "rung": 1, "train_fraction": 1 / 3}, 60) == pytest.approx(100 / 3)
    scheduler = family_scheduler()

    def trial(name, family):
        return SimpleNamespace(trial_id=name, config={"family": family})

    strong, weak, weak_peer = trial("s", "stpm"), trial("f", "fastflow"), trial("s2", "stpm")
    for t in (strong, weak, weak_peer):
        scheduler.on_trial_add(None, t)
    decisions = []
    scheduler.on_trial_result(None, strong, {"resource": 12.0, "quality": 0.9})
    decisions.append(scheduler.on_trial_result(None, weak, {"resource": 12.0, "quality": 0.2}))
    decisions.append(scheduler.on_trial_result(None, weak_peer, {"resource": 12.0, "quality": 0.2}))
    assert decisions == ["CONTINUE", "STOP"]  # fastflow is not stopped by stpm's quality; a weak stpm is
    assert set(scheduler.per_family) == {"stpm", "fastflow"}


def test_a_trial_reporting_its_last_epoch_goes_on_to_validate():
    """ASHA's rule stops trials reaching max_t; ours must go on and report their validation (the ball_screw search
    recorded STPM, CutPaste and SimpleNet defaults as "stopped early" at their first report)."""
    scheduler = family_scheduler()
    lone = SimpleNamespace(trial_id="t", config={"family": "stpm"})
    scheduler.on_trial_add(None, lone)
    assert scheduler.on_trial_result(None, lone, {"resource": 100.0, "quality": 0.8}) == "CONTINUE"


def test_patchcore_fits_add_the_coreset_seconds_to_the_linear_work():
    """PatchCore's coreset compares training patches with each other: ratio x N steps over N patches. Measured once,
    the linear part scales with the pixels and the coreset part with their square (Deep SVDD's fit stays linear)."""
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["patchcore", "deep_svdd"])
    sizes = TrialSizes(100, 20, (256, 256))
    predictor = CostPredictor(traits)
    fidelity = Fidelity(0, 1.0, 100)
    small, big = {"input_size": 256}, {"geometry": {"mode": "squash", "height": 362, "width": 362}}  # 2x pixels
    coreset = {name: traits["patchcore"].extra_fit_s(100, network_pixels(p, (256, 256)), p)
               for name, p in (("small", small), ("big", big))}
    assert coreset["big"] == pytest.approx(4 * coreset["small"], rel=0.02) and coreset["small"] > 0
    assert traits["deep_svdd"].extra_fit_s(100, 256 ** 2, small) == 0
    for family in ("patchcore", "deep_svdd"):
        fit = 40.0 + (family == "patchcore") * coreset["small"]
        predictor.observe(sizes.work(family, small, fidelity), TrialTimes(fit, 100.0), small)
    patchcore = predictor.predict(sizes.work("patchcore", big, fidelity), big).fit_s
    deep_svdd = predictor.predict(sizes.work("deep_svdd", big, fidelity), big).fit_s
    assert patchcore == pytest.approx(80.0 + coreset["big"], rel=0.02) and deep_svdd == pytest.approx(80.0, rel=0.02)


def test_padim_fits_add_its_gaussians_which_grow_with_the_channels_kept(mvtec_dir, monkeypatch):
    """PaDiM's covariance products grow with D² per patch and its inverses with D³ per grid position of one input
    (a tile's grid, not the image's), not with the pixels alone; a fit reports the seconds they took. The seconds
    per value are fixed here (the machine times them), so that only the scaling is tested."""
    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.detectors import create_detector
    from automl_ad.detectors.padim import detector as padim_module
    from automl_ad.search.proposer import family_traits

    monkeypatch.setattr(padim_module, "_gaussian_seconds_per_value", lambda dim: (1e-9, 1e-9))

    extra = family_traits(["padim"])["padim"].extra_fit_s
    base = {"backbone": "mobilenetv2_100", "feature_strides": [8, 16]}  # 32 + 96 channels
    assert extra(100, 256 ** 2, base) == pytest.approx(extra(100, 256 ** 2, {**base, "n_features": 64}))
    assert 4 < extra(100, 256 ** 2, {**base, "n_features": 128}) / extra(100, 256 ** 2, base) < 8
    tile = {**base, "geometry": {"mode": "tile", "height": 256, "width": 256, "scale": 1.0, "overlap": 0}}
    one, four = extra(100, 256 ** 2, tile), extra(100, 4 * 256 ** 2, tile)  # four tiles per image: inverses alike
    assert one < four < 4 * one
    data = open_dataset(mvtec_dir)
    padim = create_detector("padim", **create_detector("padim").test_params).fit(ImageSet.from_records(data.normal,
                                                                                                        data))
    assert 0 < padim.fit_extra_seconds_ < padim.fit_seconds_


def test_a_configuration_whose_model_would_not_fit_in_memory_is_not_started():
    """PaDiM's Gaussians grow with the grid positions x channels²: 512x512 inputs at stride 4 with 152 channels hold
    16384 inverse covariances of 152² (1.4 GiB), and the fit and the scoring graph about four times that; with less
    memory per trial it is skipped with its own reason, before any time is spent, and a smaller one still runs."""
    from automl_ad.defaults import SEARCH_TRIAL_BASE_BYTES
    from automl_ad.detectors.padim.detector import GAUSSIAN_PEAK_BYTES
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["padim"])
    big = {"backbone": "mobilenetv2_100", "feature_strides": [4, 8, 16], "n_features": 277,
           "geometry": {"mode": "squash", "height": 512, "width": 512}}
    small = {"backbone": "mobilenetv2_100", "input_size": 256}
    gaussians = 128 * 128 * 152 ** 2 * GAUSSIAN_PEAK_BYTES
    assert traits["padim"].peak_bytes(100, 512 ** 2, big) == traits["padim"].peak_bytes(9, 512 ** 2, big) == gaussians
    sizes = TrialSizes(100, 20, (512, 512))
    predictor = CostPredictor(traits, memory_per_trial_bytes=gaussians + SEARCH_TRIAL_BASE_BYTES - 1)
    plan = plan_trial(predictor, sizes, "padim", big, 1e6)
    assert plan.skip_reason == "predicted out of memory" and "7.1 GiB at its peak even with" in plan.skip
    assert plan.prediction is not None and plan.fidelity is None
    assert plan_trial(predictor, sizes, "padim", small, 1e6).skip is None
    assert plan_trial(CostPredictor(traits), sizes, "padim", big, 1e6).skip is None  # no limit known


def test_a_patchcore_fit_too_large_for_memory_runs_on_fewer_images():
    """PatchCore selects its coreset from every training patch at once, so its memory grows with the images: where
    all of them would not fit, the trial runs on the largest share that does, and is skipped when none does."""
    from automl_ad.detectors.patch_based import PATCH_PEAK_BYTES
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["patchcore"])
    params = {"backbone": "mobilenetv2_100", "geometry": {"mode": "tile", "height": 480, "width": 512, "scale": 1.0,
                                                          "overlap": 64}}
    sizes = TrialSizes(900, 100, (460, 1130))
    per_image = traits["patchcore"].peak_bytes(1, 3 * 480 * 512, params)
    assert per_image == pytest.approx(3 * 60 * 64 * 128 * PATCH_PEAK_BYTES)  # 3 tiles, 128 channels
    predictor = CostPredictor(traits)
    assert sizes.network_pixels(params) == 3 * 480 * 512
    whole = predictor.peak_bytes(sizes.work("patchcore", params, Fidelity(0, 1.0, 900)), params)
    predictor.memory_per_trial_bytes = whole / 2  # all 900 images do not fit, a third of them does
    plan = plan_trial(predictor, sizes, "patchcore", params, 1e6)
    assert plan.skip is None and plan.fidelity.train_images == 300
    predictor.memory_per_trial_bytes = 1.0
    assert plan_trial(predictor, sizes, "patchcore", params, 1e6).skip_reason == "predicted out of memory"


@pytest.mark.parametrize("family, side, batch, images, measured_mb", [
    ("stpm", 256, 8, 16, 1954), ("stpm", 512, 1, 16, 1750), ("stpm", 512, 8, 16, 4620), ("stpm", 512, 8, 32, 4831),
    ("stpm", 512, 8, 64, 5181), ("stpm", "tiles", 8, 20, 4647), ("stpm", "tiles", 8, 80, 5972),
    ("fastflow", 256, 8, 32, 1311), ("fastflow", 512, 1, 16, 1276), ("fastflow", 512, 8, 16, 2109),
    ("fastflow", 512, 8, 64, 2605), ("fastflow", 256, 32, 32, 1890), ("fastflow", 512, 32, 32, 4680)])
def test_training_families_predict_their_fit_peak_from_batch_resolution_and_images(family, side, batch, images,
                                                                                   measured_mb):
    """STPM keeps its student's activations for a batch, FastFlow its flow steps', and both the training set: fit
    peaks measured with MobileNetV2 on this machine (VmHWM, process included; random arrays, or ball_screw's files
    in 480x512 tiles, three per image) lie at or below the prediction plus a trial's base, and not far below."""
    from automl_ad.defaults import SEARCH_TRIAL_BASE_BYTES
    from automl_ad.search.proposer import family_traits

    params = {"backbone": "mobilenetv2_100", "batch_size": batch}
    if side == "tiles":
        params["geometry"], pixels = {"mode": "tile", "height": 480, "width": 512, "scale": 1.0, "overlap": 64}, \
            3 * 480 * 512
    else:
        params["input_size"], pixels = side, side * side
    predicted = family_traits([family])[family].peak_bytes(images, pixels, params) + SEARCH_TRIAL_BASE_BYTES
    assert measured_mb * 2 ** 20 <= predicted <= 1.6 * measured_mb * 2 ** 20


@pytest.mark.parametrize("family, inputs, images, measured_mb", [
    ("simplenet", 512, 32, 2363), ("simplenet", 512, 128, 2944), ("simplenet", "tiles", 40, 2874),
    ("simplenet", "tiles", 160, 3993), ("deep_svdd", 512, 32, 1341), ("deep_svdd", 512, 128, 1984),
    ("deep_svdd", "tiles", 40, 2015), ("deep_svdd", "tiles", 160, 4020), ("cutpaste", 256, 64, 1314),
    ("cutpaste", 256, 256, 1873), ("cutpaste", "tiles", 16, 1602), ("cutpaste", "tiles", 64, 2954)])
def test_patch_and_self_supervised_families_predict_their_fit_peak(family, inputs, images, measured_mb):
    """SimpleNet and Deep SVDD hold every training patch's embedding (as PatchCore), SimpleNet a step's normal and
    noisy rows too, CutPaste its training images and its density fit's copies of every patch embedding: fit peaks
    measured with MobileNetV2 and the default parameters (one epoch; VmHWM, process included; random images of
    the input size, or of ball_screw's 460x1130 in tiles: 480x512 for the patch families, CutPaste's 256-px
    squares) lie at or below the prediction plus a trial's base, and not far below."""
    from automl_ad.defaults import SEARCH_TRIAL_BASE_BYTES
    from automl_ad.search.proposer import family_traits

    params = {"backbone": "mobilenetv2_100"}
    if inputs == "tiles":
        side = (256, 256) if family == "cutpaste" else (480, 512)
        params["geometry"] = {"mode": "tile", "height": side[0], "width": side[1], "scale": 1.0,
                              "overlap": 32 if family == "cutpaste" else 64}
    else:
        params["input_size"] = inputs
    pixels = TrialSizes(images, 1, (460, 1130) if inputs == "tiles" else (inputs, inputs)).network_pixels(params)
    peak = family_traits([family])[family].peak_bytes
    predicted = peak(images, pixels, params) + SEARCH_TRIAL_BASE_BYTES
    assert measured_mb * 2 ** 20 <= predicted <= 1.6 * measured_mb * 2 ** 20
    if family == "simplenet":  # a step's rows grow with the batch: a smaller batch is what lets a large fit in
        assert peak(images, pixels, {**params, "batch_size": 2}) < peak(images, pixels, params)


def test_a_training_family_whose_batch_would_not_fit_in_memory_trains_in_smaller_batches():
    """A batch's activations grow with its images x their pixels: STPM's 8 images per batch at 1024 px need about
    15 GB (MobileNetV2), FastFlow's 32 about 15 GB (8 flow steps). With 8 GiB per trial the plan halves the batch
    until it fits (the trial's parameters then say so); with 6 GiB STPM takes fewer training images, as even one
    image per batch does not fit on all of them; with 2 GiB nothing fits and the trial is skipped as out of memory.
    At 256 px both run as configured."""
    from automl_ad.features.backbone import activation_values
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["stpm", "fastflow"])
    assert traits["stpm"].default_batch == 8 and traits["fastflow"].default_batch == 32
    sizes = TrialSizes(100, 20, (1024, 1024))
    predictor = CostPredictor(traits, memory_per_trial_bytes=8 * 2 ** 30)
    params = {"backbone": "mobilenetv2_100", "input_size": 1024}
    for family in ("stpm", "fastflow"):
        peak = traits[family].peak_bytes
        twice = {**params, "batch_size": 2 * traits[family].default_batch}
        assert peak(100, 1024 ** 2, twice) - peak(100, 1024 ** 2, params) == pytest.approx(
            peak(100, 1024 ** 2, params) - peak(100, 1024 ** 2, {**params, "batch_size": 0}))  # linear in the batch
        plan = plan_trial(predictor, sizes, family, params, 1e9)
        assert plan.skip is None and 1 <= plan.fidelity.batch_size < traits[family].default_batch
        assert f"{plan.fidelity.batch_size} image" in plan.fidelity.describe() and "per batch (memory)" in \
            plan.fidelity.describe()
        fitted = {**params, "batch_size": plan.fidelity.batch_size}
        assert predictor.peak_bytes(sizes.work(family, params, plan.fidelity), fitted) <= 8 * 2 ** 30
        if plan.fidelity.batch_size < traits[family].default_batch // 2:  # the next larger batch would not fit
            larger = {**params, "batch_size": 2 * plan.fidelity.batch_size}
            assert predictor.peak_bytes(sizes.work(family, params, plan.fidelity), larger) > 8 * 2 ** 30
        small = {"backbone": "mobilenetv2_100", "input_size": 256}
        fidelity = plan_trial(predictor, TrialSizes(100, 20, (256, 256)), family, small, 1e9).fidelity
        assert fidelity.full and fidelity.batch_size is None
    predictor.memory_per_trial_bytes = 6 * 2 ** 30  # one image per batch on all 100 images does not fit: 1/3
    assert plan_trial(predictor, sizes, "stpm", params, 1e9).fidelity.rung == 1
    predictor.memory_per_trial_bytes = 2 * 2 ** 30
    assert plan_trial(predictor, sizes, "stpm", params, 1e9).skip_reason == "predicted out of memory"
    assert activation_values("mobilenetv2_100", (4, 8, 16)) > activation_values("resnet18", (4, 8, 16)) > 100


def test_a_default_without_epochs_is_planned_with_the_family_default_epochs():
    """The warm start passes no ``epochs``; its fidelity must still know the schedule, so resource counts epochs."""
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["stpm", "padim"])
    assert traits["stpm"].default_epochs >= 1 and traits["padim"].default_epochs is None
    predictor = CostPredictor(traits)
    plan = plan_trial(predictor, TrialSizes(100, 20, (256, 256)), "stpm", {}, 1e6)
    assert plan.fidelity.full_epochs == traits["stpm"].default_epochs
    assert resource(plan.fidelity.to_dict(), 1) < 100.0


def test_the_recommended_geometry_follows_the_top_default_then_the_defaults_then_sampling():
    predictor = _slow_predictor(0.001)
    sizes = TrialSizes(270, 30, (460, 1130))
    wide = {"mode": "letterbox", "height": 224, "width": 512, "scale": None, "overlap": 0, "pad": "reflect"}
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    request = SearchRequest(data=".", families=["padim", "gaussian"], priors={"padim": 0.9, "gaussian": 0.5},
                            budget_s=3600, geometries=[wide, square])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in request.families}
    proposer = Proposer(request, spaces, {"padim": {}, "gaussian": {}}, predictor=predictor, sizes=sizes,
                        deadline=time.monotonic() + 3600, quick_look_s=0.0)
    proposals = _proposals(proposer, [0.5] * 4)
    assert [(p["family"], p["default"], p["params"].get("geometry")) for p in proposals[:3]] == [
        ("padim", True, None), ("padim", False, wide), ("gaussian", True, None)]  # gaussian reads no geometry
    fourth = proposals[3]  # then sampled: a padim trial draws its geometry from the space
    assert not fourth["default"] and fourth["params"].get("geometry", wide) in (wide, square)


def test_a_kept_default_geometry_is_not_run_again_as_a_geometry_trial():
    """When the recommendation keeps the default squash and lists only a larger one as worth searching (bottle), no
    warm-start or quick-look trial runs the default squash again as a 'geometry' (bottle's search ran PaDiM's
    default twice that way); the larger one stays in the sampled space."""
    predictor = _slow_predictor(0.001)
    sizes = TrialSizes(150, 40, (900, 900))
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    large = {**square, "height": 512, "width": 512}
    geometries = proposed_geometries({"geometry": {"geometry": square, "default": {"geometry": square},
                                                   "alternatives": [{"geometry": large}]}})
    assert geometries == [square, square, large]
    request = SearchRequest(data=".", families=["padim", "patchcore"], priors={"padim": 0.9, "patchcore": 0.8},
                            budget_s=3600, geometries=geometries)
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in request.families}
    assert list(spaces["padim"].parameters[0].choices) == [square, large]
    proposer = Proposer(request, spaces, {"padim": {}, "patchcore": {}}, predictor=predictor, sizes=sizes,
                        deadline=time.monotonic() + 3600, quick_look_s=600.0)
    proposals = _proposals(proposer, [0.5] * 6)
    only_geometry = [p for p in proposals if not p["default"] and p["params"].get("geometry") == square
                     and set(p["params"]) <= {"geometry", "weights", "device", "backbone", "input_size"}]
    assert sorted(p["family"] for p in proposals if p["default"]) == ["padim", "patchcore"] and not only_geometry


def test_the_cheapest_family_probes_every_geometry_and_the_helpful_ones_move_to_the_others():
    """Geometry-major warm start: the probe (cheapest family) tries each recommended geometry; only those that beat
    its default then run on the other families; a geometry that hurt the probe is not carried over."""
    predictor = _slow_predictor(0.001)
    sizes = TrialSizes(270, 30, (460, 1130))
    wide = {"mode": "letterbox", "height": 224, "width": 512, "scale": None, "overlap": 0, "pad": "reflect"}
    tiles = {"mode": "tile", "height": 256, "width": 256, "scale": 1.0, "overlap": 64, "pad": "reflect"}
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    request = SearchRequest(data=".", families=["stpm", "padim"], priors={"stpm": 0.9, "padim": 0.8},
                            budget_s=3600, geometries=[tiles, square, wide])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in request.families}
    proposer = Proposer(request, spaces, {"stpm": {"epochs": 20}, "padim": {}}, predictor=predictor, sizes=sizes,
                        deadline=time.monotonic() + 3600, quick_look_s=0.0)
    study = _study()
    quality = {("stpm", None): 0.8, ("padim", None): 0.7, ("padim", "letterbox"): 0.65, ("padim", "tile"): 0.9}
    proposals = []
    for _ in range(6):
        trial = study.ask()
        proposal = proposer(trial)
        proposals.append(proposal)
        key = (proposal["family"], (proposal["params"].get("geometry") or {}).get("mode"))
        study.tell(trial, [quality.get(key, 0.5), 10.0, 100.0])
    seen = [(p["family"], p["default"], p["params"].get("geometry")) for p in proposals[:5]]
    assert seen == [("stpm", True, None), ("padim", True, None), ("padim", False, tiles), ("padim", False, wide),
                    ("stpm", False, tiles)]  # the chosen tiles first; the letterbox did worse than padim's default:
    # not tried on stpm
    assert all(p["fidelity"]["rung"] == 0 for p in proposals[:5])
    assert not proposals[5]["default"] and "geometry_start" not in study.trials[5].user_attrs  # then sampling


TILES = {"mode": "tile", "height": 256, "width": 256, "scale": 1.0, "overlap": 64, "pad": "reflect"}


def _tiles_proposer(predictor, seconds_left: float) -> Proposer:
    """stpm (prior 0.9) and padim (0.8) on wide images, the recommendation's 256-px tiles chosen."""
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    request = SearchRequest(data=".", families=["stpm", "padim"], priors={"stpm": 0.9, "padim": 0.8},
                            budget_s=seconds_left, geometries=[TILES, square])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in request.families}
    return Proposer(request, spaces, {"stpm": {"epochs": 20}, "padim": {}}, predictor=predictor,
                    sizes=TrialSizes(270, 30, (460, 1130)), deadline=time.monotonic() + seconds_left,
                    quick_look_s=0.0)


@pytest.mark.parametrize("stpm_default, carried", [(0.66, True), (0.55, False)])
def test_a_helpful_geometry_moves_only_to_families_it_could_bring_near_the_best(stpm_default, carried):
    """The tiles gain the probe (padim) 0.05; stpm's default plus that gain must come within the allocation
    temperature (0.05) of the best quality so far (0.75) for the tiles to run on stpm."""
    tiles = TILES
    proposer = _tiles_proposer(_slow_predictor(0.001), 3600)
    study = _study()
    quality = {("stpm", None): stpm_default, ("padim", None): 0.7, ("padim", "tile"): 0.75}
    proposals = []
    for _ in range(4):
        trial = study.ask()
        proposals.append(proposer(trial))
        key = (proposals[-1]["family"], (proposals[-1]["params"].get("geometry") or {}).get("mode"))
        study.tell(trial, [quality.get(key, 0.5), 10.0, 100.0])
    assert [(p["family"], p["params"].get("geometry")) for p in proposals[:3]] == [
        ("stpm", None), ("padim", None), ("padim", tiles)]
    assert (study.trials[3].user_attrs.get("geometry_start") == ["stpm", json.dumps(tiles, sort_keys=True)]) \
        == carried


def test_a_warm_start_geometry_that_no_longer_fits_is_passed_over_not_recorded_as_failed():
    """Late in a search the tiles on stpm fit no fidelity in the time left, while padim still fits: the tiles are
    passed over, with no "predicted too slow" record for them (6 of 7 "failed" trials on ball_screw), and the
    search goes on sampling."""
    predictor, tiles = _slow_predictor(2.0), TILES
    proposer = _tiles_proposer(predictor, 36000)
    study = _study()
    quality = {("stpm", None): 0.7, ("padim", None): 0.7, ("padim", "tile"): 0.75}
    for _ in range(3):  # stpm's default, padim's default, the tiles on padim
        trial = study.ask()
        config = proposer(trial)
        key = (config["family"], (config["params"].get("geometry") or {}).get("mode"))
        study.tell(trial, [quality[key], 10.0, 100.0])
    lowest = max(rungs(270))
    one_epoch = {**proposer._default_params("stpm", tiles), "epochs": 1}
    tiles_on_stpm = plan_trial(predictor, proposer.sizes, "stpm", one_epoch, math.inf, lowest).prediction.total_s
    padim_cheapest = proposer._default_cost("padim", None, lowest)
    assert 2 * padim_cheapest < tiles_on_stpm
    proposer.deadline = time.monotonic() + SEARCH_END_TAIL_S + 2 * padim_cheapest
    assert proposer._geometry_starts(study.trials) == [("padim", tiles), ("stpm", tiles)]  # still to run
    trial = study.ask()
    proposer(trial)  # a sampled configuration (which may itself be too slow: that is the sampler's record)
    assert "geometry_start" not in trial.user_attrs and not proposer.exhausted
    assert proposer._passed_over == {("stpm", json.dumps(tiles, sort_keys=True))}


def test_a_screening_trial_fits_its_share_of_the_budget_with_fewer_epochs_not_the_whole_cap():
    """With 900 s left a screening trial may take 100 s (1/9): STPM trains fewer epochs on all images, instead of
    every epoch on the fewest images for most of the cap."""
    predictor = _slow_predictor(2.0)  # 50 epochs of 270 images: about 1800 s
    proposer = _proposer(["stpm"], predictor, TrialSizes(270, 30, (256, 256)), 900.0)
    room = 900.0 / SEARCH_CONFIGS_PER_BUDGET
    plan = proposer._screening_plan("stpm", {"input_size": 256, "epochs": 50}, 800.0)
    assert plan.skip is None and plan.prediction.total_s <= room
    assert plan.fidelity.epochs < 50 and plan.limit_s < 800.0


def test_the_quick_look_runs_every_default_cheapest_first_and_the_geometry_after_its_family_default():
    """Anytime: every default, cheapest first, and the recommended geometry right after the default of the family
    cheapest with it (gaussian reads no geometry), on the fewest images. The defaults' quick looks are never
    promoted (the warm start runs them in full); the geometry's is the family's warm-start geometry trial, not run
    again at its rung (on ball_screw it was, 20 s for nothing) but promoted in full when it beats every full trial.
    Gaussian at 128 px costs little more on all images than on the fewest: it runs on all, as its warm start; the
    wide geometry and STPM (scoring weighs more in them) on 1/3 of them."""
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(270, 30, (460, 1130))
    wide = {"mode": "letterbox", "height": 224, "width": 512, "scale": None, "overlap": 0, "pad": "reflect"}
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    families = ["stpm", "padim", "gaussian"]
    request = SearchRequest(data=".", families=families, priors={"stpm": 0.9, "padim": 0.8, "gaussian": 0.1},
                            budget_s=3600, geometries=[wide, square])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in families}
    defaults = {"stpm": {"epochs": 20}, "padim": {}, "gaussian": {"input_size": 128}}
    proposer = Proposer(request, spaces, defaults, predictor=predictor, sizes=sizes, deadline=time.monotonic() + 3600)
    assert proposer._default_cost("gaussian", None, 2) < proposer._default_cost("padim", None, 2)
    study = _study()
    proposals = _proposals(proposer, (0.7, 0.8, 0.95, 0.5, 0.9, 0.5), study)
    seen = [(p["family"], p["default"], p["params"].get("geometry"), p["fidelity"]["rung"]) for p in proposals]
    assert seen[:4] == [("gaussian", True, None, 0), ("padim", False, None, 2), ("padim", False, wide, 1),
                        ("stpm", False, None, 1)]
    assert [t.user_attrs["quick_look"][0] for t in study.trials[:4]] == ["gaussian", "padim", "padim", "stpm"]
    assert study.trials[2].user_attrs["geometry_start"][0] == "padim"
    assert seen[4] == ("padim", False, wide, 0) and study.trials[4].user_attrs["promoted_from"] == 2
    assert seen[5][:2] == ("stpm", True) and seen[5][3] == 0  # the warm start: no promotion of the defaults
    # a run on more images is chosen within 1.5x the fewest's cost, but its limit comes from the time left
    assert proposals[0]["timeout_s"] == pytest.approx(2 * proposals[0]["predicted_s"] + 30.0)
    assert proposer._promotions(study.trials) == []


def test_a_quick_look_geometry_on_all_images_is_not_run_again_by_the_warm_start():
    """On magnetic_tile the quick look ran PaDiM letterbox 320x288 on all images and the warm start ran it again."""
    predictor = _slow_predictor(0.001)  # everything cheap: the quick look runs on all images
    wide = {"mode": "letterbox", "height": 224, "width": 512, "scale": None, "overlap": 0, "pad": "reflect"}
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    families = ["stpm", "padim"]
    request = SearchRequest(data=".", families=families, priors={"stpm": 0.9, "padim": 0.8}, budget_s=3600,
                            geometries=[wide, square])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in families}
    proposer = Proposer(request, spaces, {"stpm": {"epochs": 2}, "padim": {}}, predictor=predictor,
                        sizes=TrialSizes(270, 30, (460, 1130)), deadline=time.monotonic() + 3600)
    proposals = _proposals(proposer, (0.8, 0.9, 0.78, 0.5))
    seen = [(p["family"], p["params"].get("geometry"), p["fidelity"]["rung"]) for p in proposals]
    assert seen[:3] == [("padim", None, 0), ("padim", wide, 0), ("stpm", None, 0)]
    assert seen[3][:2] == ("stpm", wide)  # the geometry that beat PaDiM's default, on the other family


def test_the_quick_look_gives_the_geometry_to_the_family_cheapest_with_it_coreset_counted():
    """On tiled ball_screw images the linear part alone makes PatchCore look cheaper than PaDiM; its coreset (50
    tiled images ran out of 204 s against a 50 s linear prior) makes PaDiM the one to run the geometry."""
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["patchcore", "padim"])
    linear = {**traits, "patchcore": FamilyTraits("memory_bank", False)}
    sizes = TrialSizes(454, 311, (460, 1130))
    tiles = {"mode": "tile", "height": 512, "width": 512, "scale": 1.0, "overlap": 64, "pad": "reflect"}
    square = {"mode": "squash", "height": 256, "width": 256, "scale": None, "overlap": 0, "pad": "reflect"}
    request = SearchRequest(data=".", families=["patchcore", "padim"], budget_s=1200, geometries=[tiles, square])
    spaces = {f: load_space(f).with_geometries(request.geometries) for f in request.families}

    def proposer(known):
        return Proposer(request, spaces, {"patchcore": {"input_size": 256}, "padim": {"input_size": 256}},
                        predictor=CostPredictor(known), sizes=sizes, deadline=time.monotonic() + 1200)

    assert proposer(linear)._default_cost("patchcore", tiles, 2) < proposer(linear)._default_cost("padim", tiles, 2)
    counted = proposer(traits)
    assert counted._default_cost("patchcore", tiles, 2) > counted._default_cost("padim", tiles, 2)
    candidates = counted._quick_candidates()
    assert ("patchcore", tiles) not in candidates
    assert candidates[:2] == [("padim", None), ("padim", tiles)]  # PaDiM's default is cheapest on all images


def test_the_quick_look_starts_only_what_ends_within_its_time():
    """Each default on 30 of 270 images is predicted at about 24 s (stpm at fewer epochs)."""
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(270, 30, (256, 256))
    priors = {"stpm": 0.9, "gaussian": 0.1}
    study = _study()
    proposer = _proposer(["stpm", "gaussian"], predictor, sizes, 600.0, priors, quick_look_s=30.0)
    looks = []
    for _ in range(2):
        trial = study.ask()
        looks.append(proposer(trial))
        study.tell(trial, [0.5, 10.0, 100.0])
    assert [t.user_attrs["quick_look"] for t in study.trials] == [["gaussian", ""], ["stpm", ""]]
    assert all(p["predicted_s"] <= 30.0 for p in looks) and looks[1]["params"]["epochs"] < 20
    assert all(p["timeout_s"] > 30.0 for p in looks)  # one that overruns the quick look is not killed at its end
    trial = _study().ask()
    too_short = _proposer(["stpm", "gaussian"], predictor, sizes, 600.0, priors, quick_look_s=20.0)(trial)
    assert "quick_look" not in trial.user_attrs and too_short["family"] == "stpm" and too_short["default"]


def test_a_lone_screening_trial_is_promoted_only_when_it_beats_every_full_fidelity_trial():
    predictor = _slow_predictor(0.001)
    proposer = _proposer(["gaussian"], predictor, TrialSizes(270, 30, (256, 256)), 600.0)
    study = _study()
    for q, rung in ((0.8, 0), (0.7, 2)):
        trial = study.ask()
        trial.set_user_attr("family", "gaussian")
        trial.set_user_attr("default", True)
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("params", {"q": q})
        study.tell(trial, [q, 10.0, 100.0])
    assert proposer._promotions(study.trials) == []  # one screening trial at its rung, below the full one
    trial = study.ask()
    trial.set_user_attr("family", "gaussian")
    trial.set_user_attr("rung", 2)
    trial.set_user_attr("params", {"q": 0.9})
    study.tell(trial, [0.9, 10.0, 100.0])
    assert [c[2:] for c in proposer._promotions(study.trials)] == [({"q": 0.9}, 1)]


def test_before_any_full_trial_only_the_best_screening_trial_is_promoted():
    """Nothing completed on all images yet: a screening trial below the quick look's best (0.62 against 0.81) is
    not promoted ahead of the other defaults; one above it is."""
    predictor = _slow_predictor(0.001)
    proposer = _proposer(["gaussian", "padim"], predictor, TrialSizes(270, 30, (256, 256)), 600.0)
    study = _study()
    for family, q, quick in (("padim", 0.81, True), ("gaussian", 0.62, False)):
        trial = study.ask()
        trial.set_user_attr("family", family)
        trial.set_user_attr("rung", 1)
        trial.set_user_attr("params", {"q": q})
        if quick:
            trial.set_user_attr("quick_look", [family, ""])
        study.tell(trial, [q, 10.0, 100.0])
    assert proposer._promotions(study.trials) == []
    trial = study.ask()
    trial.set_user_attr("family", "gaussian")
    trial.set_user_attr("rung", 1)
    trial.set_user_attr("params", {"q": 0.85})
    study.tell(trial, [0.85, 10.0, 100.0])
    assert [c[2:] for c in proposer._promotions(study.trials)] == [({"q": 0.85}, 0)]


def test_a_promotion_the_remaining_time_cannot_afford_is_not_run_again_at_its_own_rung():
    """Promoted to a rung that no longer fits, a trial would be planned one rung down, i.e. at its own rung again
    (the ball_screw search ran one PaDiM configuration three times so)."""
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(270, 30, (256, 256))
    params = {"input_size": 256}
    at = {rung: plan_trial(predictor, sizes, "padim", params, 1e6, rung).prediction.total_s for rung in (1, 2)}
    seconds = (at[1] + at[2]) / 2 + SEARCH_END_TAIL_S  # affords rung 2, not rung 1
    proposer = _proposer(["padim"], predictor, sizes, seconds)
    study = _study()
    for q, rung in ((0.5, 0), (0.9, 2)):
        trial = study.ask()
        trial.set_user_attr("family", "padim")
        trial.set_user_attr("default", rung == 0)
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("params", params)
        study.tell(trial, [q, 10.0, 100.0])
    assert [c[3] for c in proposer._promotions(study.trials)] == [1]
    trial = study.ask()
    proposal = proposer(trial)
    assert "promoted_from" not in trial.user_attrs and proposal.get("fidelity", {}).get("rung") != 1


def test_the_best_screening_trial_becomes_the_model_when_nothing_else_completed(tmp_path):
    from automl_ad.search.engine import _keep_a_model
    from automl_ad.tracking.board import best_so_far, leaderboard
    from automl_ad.tracking.store import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment = tracker.experiment("screened")
    parent = tracker.start_search(experiment, "s", {}, {}, [])
    for i, quality in enumerate((0.6, 0.8)):
        tracker.log_trial(experiment, parent, {"trial_id": f"t{i}", "family": "gaussian", "status": "screened",
                                               "quality": quality, "throughput": 10.0, "memory_mb": 100.0}, [])
    assert leaderboard(parent, uri, pareto=True) == []
    said = []
    _keep_a_model(tracker, parent, 12.0, said.append)
    front = tracker.tag_front(parent)
    assert [r.data.tags["trial"] for r in front] == ["t1"] and "fallback_model" in front[0].data.tags
    assert [row["trial"] for row in leaderboard(parent, uri, pareto=True)] == ["t1"]
    assert best_so_far(parent, uri) == [(12.0, 0.8)] and "no full-fidelity trial completed" in said[0]


def test_a_screening_trial_better_than_every_full_one_joins_the_models(tmp_path):
    """Its promotion no longer fitted the budget; its validation quality is as honest as the full trials'."""
    from automl_ad.search.engine import _keep_a_model
    from automl_ad.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("better")
    parent = tracker.start_search(experiment, "s", {}, {}, [])
    for name, status, quality in (("full", "ok", 0.85), ("weak", "screened", 0.7), ("strong", "screened", 0.9)):
        tracker.log_trial(experiment, parent, {"trial_id": name, "family": "padim", "status": status,
                                               "quality": quality, "throughput": 10.0, "memory_mb": 100.0,
                                               "val_normal_images": 300, "val_anomalous_images": 300}, [])
    said = []
    _keep_a_model(tracker, parent, 60.0, said.append)
    statuses = {r.data.tags["trial"]: r.data.tags["status"] for r in tracker.trials(parent)}
    assert statuses == {"full": "ok", "weak": "screened", "strong": "ok"}
    assert "better on validation than every full-fidelity trial (0.900 against 0.850)" in said[0]
    kept = [r for r in tracker.trials(parent) if r.data.tags["trial"] == "strong"][0]
    assert "trained on" in kept.data.tags["fallback_model"]
    said.clear()
    _keep_a_model(tracker, parent, 61.0, said.append)  # nothing screened beats the models now: nothing changes
    assert said == []


def test_a_screening_lead_the_validation_cannot_resolve_keeps_the_fully_trained_models(tmp_path):
    """24 normal + 24 anomalous validation images cannot tell 0.814 from 0.806 (about ±0.06): the model trained on
    all images stays the search's model, and the user is told why; the same lead on 3000 + 3000 images joins."""
    from automl_ad.search.engine import _keep_a_model
    from automl_ad.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for size, joins in ((24, False), (3000, True)):
        experiment = tracker.experiment(f"noise-{size}")
        parent = tracker.start_search(experiment, "s", {}, {}, [])
        for name, status, quality in (("full", "ok", 0.806), ("screen", "screened", 0.814)):
            tracker.log_trial(experiment, parent, {"trial_id": name, "family": "padim", "status": status,
                                                   "quality": quality, "throughput": 10.0, "memory_mb": 100.0,
                                                   "val_normal_images": size, "val_anomalous_images": size}, [])
        said = []
        _keep_a_model(tracker, parent, 60.0, said.append)
        statuses = {r.data.tags["trial"]: r.data.tags["status"] for r in tracker.trials(parent)}
        assert statuses["screen"] == ("ok" if joins else "screened")
        assert ("is one of this search's models" in said[0]) == joins
        if not joins:
            assert "led on validation by 0.008, less than its validation resolves (±0.06" in said[0]


def test_the_validation_resolution_matches_the_spread_of_auroc_over_resampled_validation_sets():
    """Hanley and McNeil's standard error against the standard deviation of the AUROC of 3000 simulated
    validation sets under their model: normal scores Exp(1), anomalous scores Exp(theta), spread wider (swapping
    the counts of normal and anomalous images changes the spread by a third, so a swapped formula fails)."""
    from sklearn.metrics import roc_auc_score

    from automl_ad.search.validation import validation_resolution

    rng = np.random.default_rng(0)
    for normals, anomalies, theta in ((24, 24, 4.0), (60, 20, 8.0), (20, 60, 8.0)):
        labels = np.r_[np.zeros(normals), np.ones(anomalies)]
        aucs = [roc_auc_score(labels, np.r_[rng.exponential(1, normals), rng.exponential(theta, anomalies)])
                for _ in range(3000)]
        expected = validation_resolution(float(np.mean(aucs)), normals, anomalies)
        assert abs(expected - np.std(aucs)) < 0.1 * np.std(aucs), (normals, anomalies, expected, np.std(aucs))
    assert validation_resolution(0.9, 0, 10) == float("inf")


def test_a_tiny_validation_set_does_not_claim_a_fine_resolution_from_a_perfect_ranking():
    """3 normal and 3 anomalous images of a good detector (true AUROC about 0.93) often rank perfectly; the
    AUROC still spreads by about 0.1 over resampled sets, so the resolution at 1.0 is not near 0 (Hanley and
    McNeil's error at 1.0 is 0.001 there)."""
    from sklearn.metrics import roc_auc_score

    from automl_ad.search.validation import validation_resolution

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(3), np.ones(3)]
    aucs = np.array([roc_auc_score(labels, np.r_[rng.exponential(1, 3), rng.exponential(14, 3)])
                     for _ in range(3000)])
    assert np.mean(aucs == 1.0) > 0.4 and 0.08 < np.std(aucs) < 0.2
    assert validation_resolution(1.0, 3, 3) > np.std(aucs)
    assert validation_resolution(0.998, 24, 24) < 0.01  # large enough sets keep the usual error


def test_screening_rungs_are_ranked_on_a_third_of_each_validation_group_but_never_on_too_few():
    """1/η of the normal images and of each anomaly kind, spread over each group (defect types come in folder
    order), at least SEARCH_MIN_SCREEN_VALIDATION per class; a small validation set is kept whole."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.defaults import SEARCH_MIN_SCREEN_VALIDATION
    from automl_ad.search.validation import screening_validation

    def images(normals: int, kinds: dict[str | None, int]) -> ImageSet:
        labels = [0] * normals + [1] * sum(kinds.values())
        names = [None] * normals + [k for k, n in kinds.items() for _ in range(n)]
        return ImageSet(arrays=[np.zeros((4, 4, 3), np.uint8)] * len(labels), labels=np.array(labels),
                        kinds=names if any(names) else None)

    big = images(120, {None: 210})
    keep = screening_validation(big)
    labels = big.labels[keep]
    assert (labels == 0).sum() == 40 and (labels == 1).sum() == 70
    assert keep[0] == 0 and keep[-1] == 329  # spread over each group, both ends included
    small = images(45, {None: 90})  # a third would leave 15 normal images: 30 of them
    labels = small.labels[screening_validation(small)]
    assert (labels == 0).sum() == SEARCH_MIN_SCREEN_VALIDATION and (labels == 1).sum() == 30
    synthetic = images(90, {"scratch": 60, "blob": 30})  # kind by kind: both kinds stay in proportion
    kept = [synthetic.kinds[i] for i in screening_validation(synthetic)]
    assert kept.count("scratch") == 20 and kept.count("blob") == 10 and kept.count(None) == 30
    assert screening_validation(images(20, {None: 30})) is None


def test_with_synthetic_anomalies_trials_are_sized_on_the_validation_a_family_is_ranked_on():
    """Synthetic validation holds several rounds of anomalies (one per kind a family may train on), but a family is
    ranked on the normal images and as many anomalies: 20 + 20 of 20 + 60, not a 'screening' of 50 (more than a
    full trial's 40, which the trial then kept whole)."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.data.synthetic import without_trained_kinds
    from automl_ad.search.proposer import trial_sizes
    from automl_ad.search.validation import screening_validation

    kinds = [None] * 20 + [k for _ in range(20) for k in ("cutpaste", "perlin", "scar")]
    validation = ImageSet(arrays=[np.zeros((8, 8, 3), np.uint8)] * 80, labels=np.array([0] * 20 + [1] * 60),
                          kinds=kinds)
    data = SimpleNamespace(train=ImageSet.from_arrays([np.zeros((8, 8, 3), np.uint8)] * 40), validation=validation)
    sizes = trial_sizes(data, ["padim"])
    ranked = without_trained_kinds(validation, ())
    assert sizes.validation_images == len(ranked) == 40
    screened = screening_validation(ranked)
    assert sizes.screen_validation_images == (None if screened is None else len(screened))


def test_a_screening_rung_predicts_and_states_its_smaller_validation():
    predictor = _slow_predictor(2.0)
    sizes = TrialSizes(454, 311, (460, 1130), screen_validation_images=104)
    params = {"input_size": 256}
    full = plan_trial(predictor, sizes, "padim", params, 1e6)
    screened = plan_trial(predictor, sizes, "padim", params, 1e6, first_rung=1)
    assert full.fidelity.validation_images is None and screened.fidelity.validation_images == 104
    assert screened.prediction.eval_s == pytest.approx(full.prediction.eval_s * 104 / 311)
    assert "ranked on 104 validation images" in screened.fidelity.describe()
    assert "validation" not in full.fidelity.describe()


def test_a_search_on_an_impossible_budget_still_ends_with_a_model(tmp_path, monkeypatch):
    """30 s for a slow family first: the search falls back to what fits, and a model is on the front."""
    from automl_ad.data.demo import generate_demo
    from automl_ad.search.engine import run_search
    from automl_ad.tracking.board import best_so_far, leaderboard
    from automl_ad.tracking.store import Tracker

    data = generate_demo(tmp_path / "data", categories=["texture"], n_train=12, n_test_good=4, n_test_per_defect=2,
                         size=64)["texture"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOML_AD_OFFLINE", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    request = SearchRequest(data=str(data), families=["stpm", "gaussian"], priors={"stpm": 0.9, "gaussian": 0.1},
                            budget_s=30, tracking_uri=uri, backbones={"stpm": ["mobilenetv2_100"]})
    result = run_search(request)
    assert any(t["status"] == "ok" for t in result.trials), result.trials
    assert leaderboard(result.parent_run_id, uri, pareto=True)
    curve = best_so_far(result.parent_run_id, uri)
    assert curve and all(b[1] >= a[1] for a, b in zip(curve, curve[1:])) and all(b[0] >= a[0] for a, b in
                                                                                  zip(curve, curve[1:]))
    runs = Tracker(uri).trials(result.parent_run_id)
    started = [r for r in runs if r.data.tags.get("failure_reason") != "predicted too slow"]
    assert all("fidelity" in r.data.tags and "time_limit_s" in r.data.tags for r in started)
    assert "best_quality.png" in {a.path for a in Tracker(uri).client.list_artifacts(result.parent_run_id)}


def test_leaderboard_states_the_best_so_far():
    from rich.console import Console

    from automl_ad.cli import _print_leaderboard

    console = Console(record=True, width=200)
    _print_leaderboard(console, [], [(4.0, 0.7), (12.0, 0.81234)])
    assert "best so far: 0.812 at 12 s" in console.export_text()


def test_leaderboard_states_how_finely_the_validation_ranks_the_best_trial():
    from rich.console import Console

    from automl_ad.cli import _print_leaderboard

    rows = [{"family": "padim", "quality": 0.814, "val_normal_images": 24, "val_anomalous_images": 24},
            {"family": "patchcore", "quality": 0.806, "val_normal_images": 24, "val_anomalous_images": 24}]
    console = Console(record=True, width=200)
    _print_leaderboard(console, rows)
    assert "validation: 24 normal + 24 anomalous images resolve about ±0.06" in console.export_text()
    console = Console(record=True, width=200)
    _print_leaderboard(console, [{"family": "padim", "quality": 0.8}])  # an older search did not record its size
    assert "resolve" not in console.export_text()


def test_the_greedy_coreset_stops_at_its_deadline_with_the_greedy_coreset_of_that_size(monkeypatch):
    """Anytime: cut at its deadline, the selection is the first picks of the uncut one (the greedy coreset of that
    size), so a trial out of fit time keeps a smaller PatchCore instead of running past its limit."""
    import torch

    from automl_ad.detectors.patchcore import detector as patchcore

    features = torch.randn(3000, 48, generator=torch.Generator().manual_seed(1))
    full = patchcore.greedy_coreset(features, 0.05, 16)
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(patchcore.time, "monotonic", lambda: next(clock))
    cut = patchcore.greedy_coreset(features, 0.05, 16, deadline=40)
    assert len(full) == 150 and len(cut) == 42 and (cut == full[:42]).all()


def _greedy_over_every_point(points, target, seed):
    """The greedy k-center selection comparing each new point with every point (the reference; squared distances
    by the same norm expansion, so rounding cannot break near-ties differently)."""
    import torch

    norms = (points * points).sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    current = int(torch.randint(len(points), (1,), generator=generator))
    nearest = torch.full((len(points),), float("inf"))
    chosen = []
    for _ in range(target):
        chosen.append(current)
        nearest = torch.minimum(nearest, norms - 2 * (points @ points[current]) + norms[current])
        current = int(torch.argmax(nearest))
    return np.array(chosen)


@pytest.mark.parametrize("sparse_share", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("clusters", [0, 40])
def test_the_greedy_coreset_skipping_far_points_selects_what_comparing_every_point_does(clusters, sparse_share,
                                                                                         monkeypatch):
    """The triangle-inequality bound only skips points a new centre cannot come nearer to: on clustered and spread
    points, with steps that compare every point (share 0), only the points the bound keeps (share 1) or either as
    their count decides, the picks equal the plain greedy's."""
    import torch

    from automl_ad.detectors.patchcore import detector as patchcore

    monkeypatch.setattr(patchcore, "_SPARSE_SHARE", sparse_share)
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(6000, 16, generator=generator)
    if clusters:
        centres = 20 * torch.randn(clusters, 16, generator=generator)
        points = 0.3 * points + centres[torch.randint(clusters, (6000,), generator=generator)]
    picks = patchcore.greedy_coreset(points, 0.05, None, seed=5)
    assert len(picks) == 300 and len(set(picks.tolist())) == 300
    assert (picks == _greedy_over_every_point(points, 300, seed=5)).all()


def test_the_coreset_estimate_is_scaled_by_what_the_fits_measured():
    """The coreset seconds are estimated for comparisons with every patch; a PatchCore trial reports the seconds
    its coreset took, and later PatchCore predictions scale the estimate by that ratio (its linear part is learnt
    from the rest of the fit)."""
    from automl_ad.search.proposer import family_traits

    traits = family_traits(["patchcore"])
    sizes, fidelity, params = TrialSizes(100, 20, (256, 256)), Fidelity(0, 1.0, 100), {"input_size": 256}
    estimate = traits["patchcore"].extra_fit_s(100, 256 ** 2, params)
    predictor = CostPredictor(traits)
    work = sizes.work("patchcore", params, fidelity)
    unmeasured = predictor.predict(work, params).fit_s
    predictor.observe(work, TrialTimes(40.0 + estimate / 3, 100.0, eval_s=30.0, extra_s=estimate / 3), params)
    assert predictor.predict(work, params).fit_s == pytest.approx(40.0 + estimate / 3, rel=1e-6)
    assert unmeasured > estimate > 0
    # measured on 100 images, the ratio says nothing of 300: their coreset is predicted unscaled (9x the patch pairs)
    larger = TrialSizes(300, 20, (256, 256)).work("patchcore", params, Fidelity(0, 1.0, 300))
    big = traits["patchcore"].extra_fit_s(300, 256 ** 2, params)
    assert big == pytest.approx(9 * estimate) and predictor.predict(larger, params).fit_s == pytest.approx(
        40.0 * 3 + big, rel=1e-6)


def test_a_patchcore_fit_past_its_deadline_keeps_what_it_selected(mvtec_dir):
    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.detectors import create_detector

    data = open_dataset(mvtec_dir)
    train = ImageSet.from_records(data.normal, data)
    params = {**create_detector("patchcore").test_params, "coreset_ratio": 0.2}
    whole = create_detector("patchcore", **params).fit(train)
    cut = create_detector("patchcore", **params).fit(train, deadline=time.monotonic())
    assert not whole.fit_cut_by_time_ and cut.fit_cut_by_time_
    assert len(cut.memory_bank_) == 1 < len(whole.memory_bank_)
    assert np.isfinite(cut.score_samples(train).image_scores).all()


def test_a_screening_trial_whose_share_fits_nothing_is_planned_in_the_whole_cap():
    """A geometry start at the screening rung late in a search: its share of the time fits no fidelity, so it is
    planned in the whole cap (this raised a TypeError inside Ray Tune and ended a ball_screw search with no result)."""
    predictor = _slow_predictor(2.0)
    proposer = _proposer(["padim"], predictor, TrialSizes(270, 30, (256, 256)), 600.0)
    config = proposer._planned(_study().ask(), "padim", {"input_size": 256}, False, None, share=0.01)
    assert "skip" not in config and config["predicted_s"] <= config["timeout_s"] and config["timeout_s"] > 0.01 * 600


def test_a_proposal_that_raises_ends_the_search_with_its_results_not_with_the_error(monkeypatch):
    proposer = _proposer(["padim"], _slow_predictor(2.0), TrialSizes(270, 30, (256, 256)), 600.0)

    def broken(trial):
        raise TypeError("'>=' not supported between instances of 'int' and 'NoneType'")

    monkeypatch.setattr(proposer, "_propose", broken)
    config = proposer(_study().ask())
    assert proposer.exhausted and config["skip_reason"] == "internal error"
    assert "TypeError" in config["skip"] and "fidelity" not in config


def test_a_default_predicted_dearer_never_trains_more_when_its_share_fits_nothing():
    """A warm-start default whose share of the time fits not even one epoch is planned in the least multiple of
    its share that fits something, not in the whole cap at once: planned there, an STPM default predicted at 158 s
    trained 67 epochs, where one predicted at 27 s (which fitted its share) trained 9."""
    trained = []
    for seconds_per_unit in (0.5, 2.0, 8.0, 32.0):
        proposer = _proposer(["stpm"], _slow_predictor(seconds_per_unit), TrialSizes(270, 30, (256, 256)), 3600.0)
        config = proposer._planned(_study().ask(), "stpm", {"input_size": 256, "epochs": 50}, True, 0, share=0.02)
        assert "skip" not in config
        trained.append(config["params"]["epochs"] * config["fidelity"]["train_fraction"])
    assert trained == sorted(trained, reverse=True) and trained[-1] < trained[0]
