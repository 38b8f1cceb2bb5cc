"""The search: Ray Tune runs trials, Optuna proposes them (:mod:`automl_ad.search.proposer`), MLflow records them.

Objectives: validation quality ↑, throughput ↑, peak memory while scoring ↓. Iterative families report quality
every few epochs; an ASHA scheduler per family stops poor ones early (on quality alone), with rungs at 1/27, 1/9
and 1/3 of each trial's own schedule (``resource``: share of its full-fidelity training done), so a family is
compared only with itself. Each trial runs in its own process
(:mod:`automl_ad.search.trial`) with a time limit, so a crash, NaN, out-of-memory or timeout fails that trial only;
an iterative family still training at ``SEARCH_TRAINING_SHARE`` of the limit stops and is evaluated as it is.

Ray itself, the scheduler and the trial processes are in :mod:`automl_ad.search.ray_runtime`.

One search writes to a working directory's search folder and to a local tracking store at a time (file locks that
name their holder; a second search is refused at once). Each search keeps its own resume state
(``searches/<parent run id>.json``) with the time spent, saved every ``SEARCH_CHECKPOINT_EVERY_S`` while it runs;
finished trials are in MLflow as they end. So after a hard kill, ``--resume`` gets the rest of the budget, records
the trials that were running as failed (``INTERRUPTED``) and runs their configurations again
(:mod:`automl_ad.search.resume`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from automl_ad.defaults import (
    FEATURE_CACHE_ENV,
    SEARCH_BEST_QUALITY_METRIC,
    SEARCH_END_TAIL_S,
    default_cache_dir,
)
from automl_ad.errors import UsageError
from automl_ad.evaluation.objectives import OBJECTIVE_METRICS, OBJECTIVE_MODES
from automl_ad.figures.plots import quality_time_plot
from automl_ad.folders import write_json_atomically
from automl_ad.search.cost_predictor import CostPredictor
from automl_ad.search.proposer import Proposer, family_traits, trial_sizes
from automl_ad.search.ray_runtime import (
    concurrency,
    family_scheduler,
    memory_per_trial,
    start_ray,
    stop_when,
    trainable_trial,
)
from automl_ad.search.request import SearchRequest, SearchResult, check_search_limits
from automl_ad.search.resume import ElapsedCheckpoint, fail_stale_trials, interrupted_trials, resume_state, state_path
from automl_ad.search.validation import validation_resolution
from automl_ad.tracking.lock import FileLock, describe_holder
from automl_ad.tracking.records import SPLIT_ARTIFACT, SearchStore
from automl_ad.tracking.store import INTERRUPTED, Tracker, default_tracking_uri, writer_lock_path
from automl_ad.workspace import experiment_name, work_dir_for


def run_search(request: SearchRequest, console=None) -> SearchResult:
    """Run (or resume) a search; returns where its results are. Refused at once while another search writes to the
    same tracking store or works on the same dataset from this working directory."""
    from automl_ad.data import open_dataset

    check_search_limits(request.budget_s, request.max_trials, request.trial_timeout_s, bool(request.resume))
    uri = request.tracking_uri or default_tracking_uri()
    with ExitStack() as held:
        store_lock = _hold_store(uri)
        if store_lock is not None:
            held.callback(store_lock.release)
        dataset = open_dataset(request.data, request.category)
        work_dir = work_dir_for(dataset)
        held.callback(_hold(work_dir / "search.lock", f"the search folder {work_dir}",
                            "or search the same data from another working directory").release)
        state = resume_state(work_dir, request, uri) if request.resume else None
        return _run_held(request, dataset, work_dir, uri, state, console)


def check_store_free(tracking_uri: str | None) -> None:
    """Fail at once (e.g. before planning a search) when another search is writing to the tracking store."""
    lock = _hold_store(tracking_uri or default_tracking_uri())
    if lock is not None:
        lock.release()


def _hold_store(uri: str) -> FileLock | None:
    """The single-writer lock of a local tracking store (None for a server, which serialises writes itself)."""
    path = writer_lock_path(uri)
    if path is None:
        return None
    return _hold(path, f"the tracking store {uri}",
                 "or give this search its own store (--tracking-uri sqlite:///OTHER/mlflow.db)")


def _hold(path: Path, what: str, alternative: str) -> FileLock:
    """The single-writer lock at ``path``, or a UsageError naming the search that holds it."""
    lock = FileLock(path)
    holder = lock.try_acquire()
    if holder is not None:
        raise UsageError(f"another search is already writing to {what}: {describe_holder(holder)}. Wait for it to "
                         f"end, or stop it (kill {holder.get('pid', 'PID')}) and continue it later with "
                         f"`automl-ad search --resume`, {alternative}. (Lock file: {path})")
    return lock


def _run_held(request: SearchRequest, dataset, work_dir: Path, uri: str, state: dict | None,
              console) -> SearchResult:
    from automl_ad.search.space import load_space
    from automl_ad.search.validation import prepare_search_data

    work_dir.mkdir(parents=True, exist_ok=True)
    spaces = {f: load_space(f).narrowed(request.backbones.get(f)).with_geometries(request.geometries)
              for f in request.families}
    defaults = {f: _fixed_params(f, spaces[f], request) for f in request.families}
    search_data = prepare_search_data(dataset, work_dir, request.validation, request.seed, request.families,
                                      request.compare_synthetic)
    data_file = work_dir / Path(SPLIT_ARTIFACT).name  # logged with the search: export and report read it back
    data_file.write_text(json.dumps(search_data.to_json()))
    tracker = Tracker(uri)
    experiment_id = tracker.experiment(experiment_name(dataset))
    say = console.print if console else print
    reruns = []
    if state is None:
        snapshot = work_dir / "search_space.json"
        snapshot.write_text(json.dumps({f: [asdict(p) for p in spaces[f].parameters] for f in spaces}, indent=2,
                                       default=list))
        logged = (request.profile_file, request.recommendation_file, request.screen_file)
        files = [snapshot, data_file] + [Path(p) for p in logged if p]
        parent = tracker.start_search(
            experiment_id, f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            {"data": str(dataset.root), "families": request.families, "budget_s": request.budget_s,
             "max_trials": request.max_trials, "seed": request.seed, "metric": request.metric,
             "false_alarm_rate": request.false_alarm_rate,
             "validation": search_data.validation_kind, "split": search_data.describe(),
             "priors": request.priors, "backbones": request.backbones, "limits": request.limits,
             "work_dir": str(work_dir.resolve())},
            {"dataset": dataset.name, "fingerprint": dataset.fingerprint()}, files)
        state = {"parent_run_id": parent, "study": f"search-{parent}", "elapsed_s": 0.0,
                 "budget_s": request.budget_s, "finished": False, "tracking_uri": tracker.uri, "created": time.time()}
    else:
        if not tracker.has_run(state["parent_run_id"]):
            raise UsageError(f"search {state['parent_run_id']} is no longer in the tracking store {tracker.uri} "
                             "(deleted?); start a new search without --resume")
        reruns = interrupted_trials(work_dir, state["parent_run_id"], tracker, experiment_id, request.routes)
        if reruns:
            say(f"{len(reruns)} trial(s) were running when this search was stopped: recorded as failed "
                f"({INTERRUPTED}) and run again: {', '.join(r['trial_id'] for r in reruns)}")
    parent = state["parent_run_id"]
    state_file = state_path(work_dir, parent)
    write_json_atomically(state_file, state)
    remaining = state["budget_s"] - state["elapsed_s"]
    say(f"Search {parent} on {dataset.root} ({search_data.describe()}); families {', '.join(request.families)}; "
        f"budget left {remaining:.0f} s; tracking {tracker.uri}")
    if remaining <= 0:
        raise UsageError(f"search {parent} has used its budget of {state['budget_s']:.0f} s; start a new search "
                         "(without --resume) or give a larger --budget")
    checkpoint = ElapsedCheckpoint(state_file, state)
    try:
        cut_short = _tune(request, spaces, defaults, work_dir, data_file, state, remaining, tracker, experiment_id,
                          reruns, console, trial_sizes(search_data, request.families))
    finally:
        checkpoint.stop()
    if cut_short:
        say(f"the search was stopped after {state['elapsed_s']:.0f} s of its {state['budget_s']:.0f}-s budget "
            f"(interrupted): `automl-ad search {dataset.root} --resume` from this folder continues it with the rest")
    _keep_a_model(tracker, parent, state["elapsed_s"], say, request.trial_timeout_s)
    front = tracker.tag_front(parent)
    _log_best_quality_plot(tracker, parent)
    for run in front:
        model = work_dir / "trials" / run.data.tags["trial"] / "model"
        if model.is_dir() and not tracker.has_model(run.info.run_id):
            tracker.log_model(run.info.run_id, model)
    state["finished"] = state["elapsed_s"] >= state["budget_s"] - 1 or request.max_trials is not None
    write_json_atomically(state_file, state)
    tracker.finish_search(parent)
    if search_data.synthetic_reference is not None:  # last: stopping it loses nothing of the search
        _compare_on_synthetic(tracker, parent, work_dir, search_data.synthetic_reference, request, say)
    records = SearchStore(tracker=tracker).trials(parent)
    return SearchResult(parent, experiment_name(dataset), tracker.uri, [t.row() for t in records],
                        [t.row() for t in records if t.complete and t.on_front], str(work_dir))


def _keep_a_model(tracker, parent: str, elapsed_s: float, say, trial_timeout_s: float | None = None) -> None:
    """A search never ends without its best model. When no full-fidelity trial completed, or a screening trial
    (trained on a share of the images) did better on validation than every one that did by more than the
    validation resolves (:func:`~automl_ad.search.validation.validation_resolution`: its promotion no longer fitted
    the budget), the best screening trial becomes one of the search's models, tagged ``fallback_model`` with what
    it was trained on. A lead within that noise keeps the fully trained models: a 3-minute search on 96 normal
    images otherwise exported a PaDiM fitted on 11 of them for a lead of 0.008 that 24 + 24 validation images
    cannot resolve (about 0.06)."""
    runs = tracker.trials(parent)
    measured = [r for r in runs if "quality" in r.data.metrics]
    full = [r.data.metrics["quality"] for r in measured if r.data.tags.get("status") == "ok"]
    screened = [r for r in measured if r.data.tags.get("status") == "screened"]
    best = max(screened, key=lambda r: r.data.metrics["quality"], default=None)
    if best is None:
        if not full:
            limit = "" if trial_timeout_s is None else f" and the --trial-timeout of {trial_timeout_s:g} s"
            say(f"no trial completed within the budget{limit}: there is no model to export; give a larger --budget"
                f"{'' if trial_timeout_s is None else ' or --trial-timeout'}")
        return
    score, what = best.data.metrics["quality"], best.data.tags.get("fidelity", "a share of the training images")
    if full:
        metrics = best.data.metrics
        noise = validation_resolution(score, int(metrics.get("val_normal_images", 0)),
                                      int(metrics.get("val_anomalous_images", 0)))
        noise = 0.0 if math.isinf(noise) else noise  # runs that did not record their validation's size
        if score <= max(full) + noise:
            if score > max(full):
                say(f"the screening trial {best.data.tags.get('trial')} ({best.data.tags.get('family')}, trained on "
                    f"{what}) led on validation by {score - max(full):.3f}, less than its validation resolves "
                    f"(±{noise:.3f}): the search's models stay the fully trained ones; a larger --budget trains it "
                    "on all images")
            return
    why = (f"better on validation than every full-fidelity trial ({score:.3f} against {max(full):.3f}); trained "
           f"on {what}") if full else f"no full-fidelity trial completed; trained on {what}"
    tracker.set_tags(best.info.run_id, {"status": "ok", "fallback_model": why})
    logged = [value for _, value in tracker.metric_history(parent, SEARCH_BEST_QUALITY_METRIC)]
    if score > max(logged, default=-math.inf):  # the live curve counts screened trials
        tracker.log_metric(parent, SEARCH_BEST_QUALITY_METRIC, score, step=int(elapsed_s))
    say(f"the screening trial {best.data.tags.get('trial')} ({best.data.tags.get('family')}) is one of this search's "
        f"models: {why}; a larger --budget trains it on all images")


def _compare_on_synthetic(tracker, parent: str, work_dir: Path, reference, request: SearchRequest, say) -> None:
    """``--compare-synthetic``: every trial with a saved model scored on the synthetic anomalies, after the budget
    (trials never pay for it, so the search runs as it would for a user); trials that have the scores (a resumed
    search) are skipped, and a model that cannot be scored is named and left out (one int8 FastFlow that did not
    load ended a magnetic_tile search with a traceback)."""
    from automl_ad.progress import track
    from automl_ad.search.validation import synthetic_comparison

    runs = [r for r in tracker.trials(parent) if "quality" in r.data.metrics
            and "synthetic_quality" not in r.data.metrics
            and (work_dir / "trials" / r.data.tags.get("trial", "") / "model").is_dir()]
    if not runs:
        return
    say(f"--compare-synthetic: scoring {len(runs)} trials' models on {len(reference)} validation images with "
        "synthetic anomalies (after the budget) ...")
    failed = []
    for run in track(runs, "synthetic comparison"):
        try:
            metrics = synthetic_comparison(work_dir / "trials" / run.data.tags["trial"] / "model", reference,
                                           request.metric, request.false_alarm_rate)
        except Exception as error:  # noqa: BLE001 - one model that cannot be scored must not cost the others theirs
            failed.append(f"trial {run.data.tags['trial']} ({type(error).__name__}: {error})")
            continue
        tracker.log_metrics(run.info.run_id, metrics)
    if failed:
        say(f"--compare-synthetic: {len(failed)} model(s) could not be scored and are left out of the comparison: "
            + "; ".join(failed))


def _log_best_quality_plot(tracker, parent: str) -> None:
    """The best-so-far quality over the search's time, beside the Pareto plot of the search run."""
    points = tracker.metric_history(parent, SEARCH_BEST_QUALITY_METRIC)
    if not points:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(parent, quality_time_plot(sorted(points), Path(tmp) / "best_quality.png"))


def _fixed_params(family: str, space, request: SearchRequest) -> dict:
    """Parameters every trial of ``family`` gets: device, the default input size (stated, so that the cost
    predictor knows the pixels a default processes), and for backbone families an allowed backbone."""
    from automl_ad.detectors import detector_class
    from automl_ad.detectors.feature_based import BackboneDetector

    cls = detector_class(family)
    accepted = cls._get_param_names()
    params = {"device": request.device} if "device" in accepted else {}
    if "input_size" in accepted:
        params["input_size"] = cls().input_size
    if issubclass(cls, BackboneDetector):
        choices = next((p.choices for p in space.parameters if p.type == "backbone"), ())
        default = cls().backbone
        allowed = list(choices)
        if default not in allowed:
            default = request.preferred_backbone if request.preferred_backbone in allowed else allowed[0]
        params["backbone"] = default
    return params


def _tune(request, spaces, defaults, work_dir, data_file, state, remaining, tracker, experiment_id, reruns,
          console, sizes) -> bool:
    """Run the trials; returns whether the search was cut short (interrupted before its budget ran out)."""
    start_ray(request.address)  # first: whether a local Ray listens on 127.0.0.1 only is settled as ray is imported
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from automl_ad.search.progress import SearchCallback  # a Ray Tune callback: ray is imported only after start_ray

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failed trials are reported by SearchCallback
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Ray warns when a define-by-run function takes over a second; the proposer's does on purpose (it plans each
    # trial: cost prediction, and the first time a family's Gaussians or coreset are timed on this machine)
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
    parallel, resources, threads = concurrency()
    if resources.get("gpu") and request.device != "cpu":  # int8 runs through ONNX Runtime on CPU only
        spaces = {family: space.for_gpu() for family, space in spaces.items()}
    storage = optuna.storages.RDBStorage(f"sqlite:///{work_dir / 'optuna.db'}",
                                         engine_kwargs={"connect_args": {"timeout": 30}})
    fail_stale_trials(storage, state["study"])
    sampler = optuna.samplers.TPESampler(seed=request.seed, multivariate=True, group=True, constant_liar=True,
                                         n_startup_trials=max(4, len(request.families)))
    deadline = time.monotonic() + remaining
    traits = family_traits(request.families)
    predictor = CostPredictor(traits, threads=threads, device="cuda" if resources.get("gpu") else "cpu",
                              memory_per_trial_bytes=memory_per_trial(resources))
    proposer = Proposer(request, spaces, defaults, reruns, predictor, sizes, deadline, parallel)
    searcher = OptunaSearch(space=proposer, metric=OBJECTIVE_METRICS, mode=OBJECTIVE_MODES, sampler=sampler,
                            study_name=state["study"], storage=storage)
    max_trials = -1  # unlimited: the budget ends the search
    if request.max_trials is not None:
        max_trials = request.max_trials - len(tracker.finished_trial_ids(state["parent_run_id"]))
        if max_trials <= 0:
            return False
    callback = SearchCallback(tracker, experiment_id, state["parent_run_id"], request, work_dir,
                              remaining, console, predictor=predictor, sizes=sizes,
                              elapsed_before_s=state["elapsed_s"])
    trainable = tune.with_parameters(trainable_trial, work_dir=str(work_dir), data_file=str(data_file),
                                     metric=request.metric, timeout_s=remaining, threads=threads,
                                     cache_dir=str(Path(os.environ.get(FEATURE_CACHE_ENV) or default_cache_dir())),
                                     search_id=state["parent_run_id"], false_alarm_rate=request.false_alarm_rate)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=family_scheduler(), num_samples=max_trials,
                                    max_concurrent_trials=parallel, time_budget_s=remaining),
        run_config=tune.RunConfig(name=f"{state['study']}-{int(time.time())}", storage_path=str(work_dir / "ray"),
                                  callbacks=[callback], verbose=0, stop=stop_when(proposer),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    try:
        tuner.fit()
    finally:
        callback.close()
    # Ray Tune ends on Ctrl+C as on its budget; neither the budget, the trial count nor the stopper ended it here
    return max_trials < 0 and not proposer.exhausted and time.monotonic() < deadline - SEARCH_END_TAIL_S
