"""The search: Ray Tune runs trials, Optuna proposes them, MLflow records them. The only module importing ray.

How trials are proposed (define-by-run, :class:`Proposer`):

0. **Quick look** (anytime). During the first ``SEARCH_QUICK_LOOK_SHARE`` of the budget, every family's default
   runs, cheapest on all training images first, on the fewest training images (the lowest rung), or on more when
   that costs little more (``SEARCH_QUICK_LOOK_FULL_COST``: scoring the validation images dominates); when the
   recommendation chose an input geometry other than the default, the family cheapest with it runs it right after
   its own default. Each runs only when predicted to end within that time. A default that ran on all images is
   the family's warm-start default; the others are screened models like any other (the search keeps the best of
   them if nothing beats it) and take no part in promotions (the warm start runs those
   defaults in full next). The geometry's trial is its family's warm-start geometry trial at whatever fidelity
   it ran, promoted like any screening trial. So a model close to the final best exists early, and every
   family's cost is measured before the full runs are planned.
1. **Warm start.** The first trial of every family is its default configuration (defaults from the detector, the
   backbone narrowed to what fits the latency budget and has weights), highest prior first. When the recommendation
   chose an input geometry other than the default squash (wide images, small defects), a *probe* family (the one
   predicted cheapest with the chosen geometry) runs it first, as soon as a trial of the probe has measured its cost
   on this data (the quick look's, else its default), so that a good model exists early: the chosen geometry is the
   cheapest that keeps the smallest defect visible, the likeliest to help. After
   the defaults the probe runs every other recommended geometry (cheapest first);
   the geometries that beat its default then run on the other families (best geometry first, families by the
   quality of their default) that they could bring within ``ALLOCATION_TEMPERATURE`` of the best quality so far,
   at the fidelity the budget affords. How much a geometry helps depends mostly on the
   data, so the cheapest family measures it; the screening rungs then promote the configurations that work.
   Each warm-start trial may take at most an equal part of the remaining time (1 / (defaults left + 2)), so an
   iterative default trains fewer epochs rather than eat the budget (unless nothing fits in that part).
2. **Family allocation.** Afterwards each trial picks a family at random with weight
   ``prior × (exp((q_f - q_best) / 0.05) + front_share_f) × 0.5^failures_f``: ``prior`` is the recommender's
   route score (0-1), ``q_f`` the family's best validation quality so far, ``front_share_f`` the share of the
   current Pareto front it holds (a fast family that defines the cheap end of the front keeps getting trials even
   when its quality is lower). Families whose default is still running keep their prior.
3. **Parameters.** Optuna's multi-objective TPE (grouped, so each family's conditional space is modelled on its own
   trials) samples the family's space from ``search_spaces/<family>.yaml``.

Budget (:mod:`automl_ad.search.cost_predictor`): every proposal is planned before it starts. Its seconds are
predicted from its work (training images × epochs × network pixels, validation images × pixels), the family's cost
measured earlier in this search, else the cost model scaled by the machine speed measured so far (evaluation: as
the other families measured it). It runs at the
highest fidelity that fits: all training images, else 1/3 or 1/9 of them (iterative families first train fewer
epochs; these screening rungs are ranked on 1/3 of the validation images, at least ``SEARCH_MIN_SCREEN_VALIDATION``
of each class), with a limit of twice the prediction plus slack, capped by the remaining budget; what fits nowhere is
recorded as skipped ("predicted too slow") and never started. Until a trial has completed, part of the budget is
kept for the cheapest candidate; once something failed, the cheapest candidate (lowest fidelity) runs next. New
configurations start at the highest fidelity (iterative families: fewer epochs first) at which the budget still
affords ``SEARCH_CONFIGS_PER_BUDGET`` of them; a screening trial in the top third of its rung (one per three
there), or better than every full-fidelity trial (before any completed: the best screening trial so far), is run
again one rung up (successive halving). Screening
trials are recorded with status ``screened`` and stay off the Pareto front, unless none at full fidelity
completed or the best of them beat every one that did by more than the validation set resolves: then the best of
them joins the search's models (tag ``fallback_model``).

Objectives: validation quality ↑, throughput ↑, peak memory while scoring ↓. Iterative families report quality
every few epochs; an ASHA scheduler per family stops poor ones early (on quality alone), with rungs at 1/27, 1/9
and 1/3 of each trial's own schedule (``resource``: share of its full-fidelity training done), so a family is
compared only with itself. Each trial runs in its own process
(:mod:`automl_ad.search.trial`) with a time limit, so a crash, NaN, out-of-memory or timeout fails that trial only;
an iterative family still training at ``SEARCH_TRAINING_SHARE`` of the limit stops and is evaluated as it is.

One search writes to a working directory's search folder and to a local tracking store at a time (file locks that
name their holder; a second search is refused at once). Each search keeps its own resume state
(``searches/<parent run id>.json``) with the time spent, saved every ``SEARCH_CHECKPOINT_EVERY_S`` while it runs;
finished trials are in MLflow as they end. So after a hard kill, ``--resume`` gets the rest of the budget, records
the trials that were running as failed (``INTERRUPTED``) and runs their configurations again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import numbers
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from automl_ad.defaults import (
    DEFAULT_FALSE_ALARM_RATE,
    FEATURE_CACHE_ENV,
    SEARCH_ARTIFACT_CAP_MB,
    SEARCH_BEST_QUALITY_METRIC,
    SEARCH_CACHE_CAP_MB,
    SEARCH_CHECKPOINT_EVERY_S,
    SEARCH_CONFIGS_PER_BUDGET,
    SEARCH_END_TAIL_S,
    SEARCH_FALLBACK_RESERVE,
    SEARCH_MAX_BUDGET_S,
    SEARCH_NODE_LOSS_GRACE_S,
    SEARCH_QUICK_LOOK_FULL_COST,
    SEARCH_QUICK_LOOK_SHARE,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_REPORT_EVERY,
    SEARCH_SIZE_SAMPLES,
    default_cache_dir,
)
from automl_ad.errors import UsageError
from automl_ad.evaluation.objectives import OBJECTIVE_METRICS, OBJECTIVE_MODES, pareto_ranks
from automl_ad.figures.plots import quality_time_plot
from automl_ad.search.cost_predictor import (
    CostPredictor,
    FamilyTraits,
    TrialPlan,
    TrialSizes,
    plan_trial,
    rungs,
)
from automl_ad.search.trial import NODE_FILE, unreported_failure
from automl_ad.search.validation import screening_validation, validation_resolution
from automl_ad.tracking.lock import FileLock, describe_holder
from automl_ad.tracking.records import SPLIT_ARTIFACT, SearchStore
from automl_ad.tracking.store import INTERRUPTED, Tracker, default_tracking_uri, writer_lock_path
from automl_ad.workspace import experiment_name, work_dir_for

ALLOCATION_TEMPERATURE = 0.05


@dataclass
class SearchRequest:
    """Everything a search needs; the CLI fills it from arguments, the recommend state and the profile."""

    data: str
    category: str | None = None
    families: list[str] = field(default_factory=list)
    priors: dict[str, float] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    budget_s: float | None = 3600.0  # None when resuming: the search keeps its own budget
    max_trials: int | None = None
    seed: int = 0
    metric: str = "combined"
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE  # the operating point of --metric detection_at_far
    validation: str = "auto"
    compare_synthetic: bool = False  # ranking on real defects: score synthetic anomalies too (selection agreement)
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    trial_timeout_s: float | None = None
    backbones: dict[str, list[str]] = field(default_factory=dict)  # per family: allowed backbones (absent = any)
    backbone_weights: dict[str, str] = field(default_factory=dict)
    preferred_backbone: str | None = None
    geometries: list[dict] = field(default_factory=list)  # recommended input geometries (chosen first)
    device: str = "auto"
    cache_cap_mb: float = SEARCH_CACHE_CAP_MB
    artifact_cap_mb: float = SEARCH_ARTIFACT_CAP_MB
    profile_file: str | None = None
    recommendation_file: str | None = None
    limits: dict = field(default_factory=dict)  # the constraint profile's deployment limits (export honours them)


@dataclass
class SearchResult:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    trials: list[dict]
    front: list[dict]
    work_dir: str


# --- proposals ----------------------------------------------------------------------------------------------------
class Proposer:
    """Define-by-run proposal function for OptunaSearch (see the module docstring).

    Every proposal carries a fidelity and a time limit from :func:`plan_trial`; ``exhausted`` turns True (and the
    search stops) when no family fits the remaining budget even at its cheapest fidelity, or when planning a trial
    raised (recorded as a skipped trial naming the error: the search then ends normally with what it has).
    """

    def __init__(self, request: SearchRequest, spaces: dict, defaults: dict, reruns: list[dict] | None = None,
                 predictor: CostPredictor | None = None, sizes: TrialSizes | None = None,
                 deadline: float | None = None, parallel: int = 1, quick_look_s: float | None = None):
        self.request, self.spaces, self.defaults = request, spaces, defaults
        self.order = sorted(request.families, key=lambda f: -request.priors.get(f, 0.5))
        self.reruns = list(reruns or [])  # specs of trials a killed search interrupted, proposed again first
        self.predictor = predictor or CostPredictor({})
        self.sizes = sizes or TrialSizes(1, 1, (256.0, 256.0))
        self.deadline = deadline if deadline is not None else time.monotonic() + (request.budget_s or 3600.0)
        self.parallel = max(1, parallel)
        if quick_look_s is None:
            quick_look_s = SEARCH_QUICK_LOOK_SHARE * max(0.0, self.deadline - time.monotonic())
        self.quick_look_end = time.monotonic() + quick_look_s
        self._passed_over: set[tuple[str, str]] = set()  # warm-start geometry trials that no longer fit (logged)
        self.exhausted = False

    def __call__(self, trial):
        try:
            return self._propose(trial)
        except Exception as error:  # a planning bug must not end the search without its finished trials' results
            logging.getLogger(__name__).exception("proposing trial %s failed", trial.number)
            return self._give_up(trial, f"the search could not plan its next trial ({type(error).__name__}: "
                                        f"{error}); it stops here and keeps what it has. Please report this",
                                 "internal error")

    def _propose(self, trial):
        if self.reruns:
            spec = self.reruns.pop(0)
            trial.set_user_attr("family", spec["family"])
            trial.set_user_attr("default", spec["default"])
            config = {"family": spec["family"], "params": spec["params"], "default": spec["default"],
                      "rerun_of": spec["trial_id"]}
            if spec.get("fidelity"):
                trial.set_user_attr("rung", spec["fidelity"]["rung"])
                config.update(fidelity=spec["fidelity"], timeout_s=self._cap(complete=True))
            return config
        earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        quick = self._quick_look(trial, earlier)
        if quick is not None:
            return quick
        complete = bool(_complete(earlier))
        for source, family, params, rung in self._promotions(earlier):
            if self._fits_at(family, params, rung, complete):  # else it would run at its own rung again
                trial.set_user_attr("promoted_from", source)
                default = self._default_params(family) == params
                return self._planned(trial, family, params, default, rung)
        started = {t.user_attrs.get("family") for t in earlier
                   if t.user_attrs.get("default") and not t.user_attrs.get("interrupted")}
        pending = [f for f in self.order if f not in started]
        failed_first = not complete and any(t.user_attrs.get("family") for t in earlier
                                            if _failed(t) and not t.user_attrs.get("interrupted"))
        if failed_first:  # nothing has finished yet and something failed: the cheapest candidate next
            return self._fallback(trial, earlier)
        tried = {tuple(t.user_attrs["geometry_start"]) for t in earlier
                 if t.user_attrs.get("geometry_start") and not t.user_attrs.get("interrupted")}
        starts = [(f, g) for f, g in self._geometry_starts(earlier)
                  if (f, _geometry_key(g)) not in tried]
        # the warm start shares the time with what follows it: each of its trials gets at most an equal part of
        # the remaining time (an iterative default trains fewer epochs rather than eat the budget)
        share = 1.0 / (len(pending) + 2)
        measured = started | {t.user_attrs.get("family") for t in _complete(earlier)}
        if starts and not tried and starts[0][0] in measured:  # the chosen geometry on the probe family as soon
            return self._geometry_start(trial, *starts[0], rung=0, share=share)  # as its cost here is measured
        if pending:
            family = pending[0]
            return self._planned(trial, family, self._default_params(family), True, 0, share)
        if starts:  # the probe family on every geometry, then the geometries that helped it on the others
            start = next(((f, g) for f, g in starts if self._start_fits(f, g, complete)), None)
            if start is not None:
                return self._geometry_start(trial, *start, rung=None)
        fitting = [f for f in self.order if self._cheapest(f).skip is None]
        if not fitting:
            return self._give_up(trial, f"no family fits the remaining budget: {self._cheapest(self.order[0]).skip}")
        family = self._pick_family(trial, earlier, fitting)
        values = self.spaces[family].sample(trial, prefix=f"{family}/")
        return self._planned(trial, family, self._with_weights({**self.defaults[family], **values}), False,
                             None)

    def _quick_look(self, trial, earlier) -> dict | None:
        """The next quick-look candidate (module docstring, step 0), if predicted to end within the quick look's
        time left; None once no candidate is left or fits, and for good once any other trial was proposed (a resumed
        search does not go back to it). It runs on the fewest training images, or on more (all, else 1/η) when
        that is predicted to cost at most ``SEARCH_QUICK_LOOK_FULL_COST`` × as much: not at the fidelity an equal
        share of the time affords, because then one misjudged family eats the quick look. A default on all images
        is the family's warm-start default; a geometry is its warm-start geometry trial at any fidelity (on
        ball_screw the warm start ran the quick look's tiled PaDiM on 1/3 of the images again)."""
        left = self.quick_look_end - time.monotonic()
        if left <= 0 or any(not t.user_attrs.get("quick_look") for t in earlier):
            return None
        looked = {tuple(t.user_attrs["quick_look"]) for t in earlier if t.user_attrs.get("quick_look")}
        pending = [(f, g, (f, _geometry_key(g) if g else "")) for f, g in self._quick_candidates()]
        pending = [c for c in pending if c[2] not in looked]
        cap = self._cap(bool(_complete(earlier)))  # its limit: one that overruns the quick look still counts
        lowest = max(rungs(self.sizes.train_images))
        for family, geometry, key in pending:
            params = self._default_params(family, geometry)
            plan = plan_trial(self.predictor, self.sizes, family, params, cap, lowest, within_s=left)
            if plan.skip is None:
                more = plan_trial(self.predictor, self.sizes, family, params, cap,
                                  within_s=min(left, SEARCH_QUICK_LOOK_FULL_COST * plan.prediction.total_s))
                plan = plan if more.skip is not None else more
                trial.set_user_attr("quick_look", list(key))
                if geometry is not None:  # the warm start does not run it again; promotions take it up
                    trial.set_user_attr("geometry_start", list(key))
                return self._config(trial, family, params, geometry is None and plan.fidelity.full, plan)
        return None

    def _quick_candidates(self) -> list[tuple[str, dict | None]]:
        """(family, geometry or None for its default), the default cheapest on all training images first (what a
        family's quick look shows comes closest to its full run when the full run is cheap: on the fewest
        magnetic_tile images PatchCore looked cheapest, took the whole quick look with two screening runs and
        left PaDiM, whose full default takes half a minute, out). When the recommendation chose a geometry other
        than the default (the first it lists: it expects the defaults' squash to leave the defects too few
        feature cells), the family cheapest with it runs it right after its own default, which measured the
        family's cost on this data: the geometry starts only if that measurement says it ends in time (run first
        on the cost model's word, a tiled PaDiM on ball_screw took the first 204 s and gave nothing). When it does
        not, the warm start runs it first (see :meth:`_propose`): after all the defaults, the best ball_screw model
        came 767 s into a 1200-s search."""
        candidates = [(f, None) for f in sorted(self.order, key=lambda f: self._default_cost(f, None))]
        chosen = self.request.geometries[0] if self._recommended_geometries() else None
        takers = [f for f in self.order if chosen is not None and self._takes(f, chosen)]
        if takers:
            probe = min(takers, key=lambda f: self._default_cost(f, chosen))
            candidates.insert(candidates.index((probe, None)) + 1, (probe, chosen))
        return candidates

    def _recommended_geometries(self) -> list[dict]:
        """The recommendation's geometries other than the default (the second it lists): the chosen one (the
        first it lists), then the others cheapest first; none when it kept the default. On ball_screw the chosen
        512-px tiles came last of three, cheapest first, 14 minutes into a 20-minute search, and were the best."""
        geometries = self.request.geometries
        if len(geometries) < 2 or geometries[0] == geometries[1]:
            return []
        others = [g for g in geometries[2:] if g not in geometries[:2]]
        return [geometries[0], *sorted(others, key=lambda g: self.sizes.network_pixels({"geometry": g}))]

    def _geometry_starts(self, earlier) -> list[tuple[str, dict]]:
        """(family, geometry) warm-start trials, in order. The *probe* (the family whose default is predicted
        cheapest with the chosen geometry) tries every recommended geometry first, in the order of
        :meth:`_recommended_geometries`: how much a geometry helps depends mostly on the data (defect size against
        resolution), so the cheapest family measures it. Then each geometry that beat the probe's default (best
        first; unmeasured ones last) runs on the other families, best default first, but only on a family that
        the geometry could bring within ``ALLOCATION_TEMPERATURE`` of the best quality so far (its default plus
        what the geometry gained the probe): on magnetic_tile a letterbox that gained PaDiM 0.013 went on to STPM
        and FastFlow, 0.12 and 0.17 behind, and took 540 s of a 1200-s search."""
        geometries = self._recommended_geometries()
        families = [f for f in self.order if any(self._takes(f, g) for g in geometries)]
        if not families:
            return []
        probe = min(families, key=lambda f: self._default_cost(f, geometries[0]))
        probing = [(probe, g) for g in geometries if self._takes(probe, g)]
        done = _complete(earlier)

        def best(family: str, geometry: dict | None) -> float | None:
            key = None if geometry is None else [family, _geometry_key(geometry)]
            values = [t.values[0] for t in done if t.user_attrs.get("family") == family and (
                t.user_attrs.get("default") if key is None else t.user_attrs.get("geometry_start") == key)]
            return max(values, default=None)

        baseline = best(probe, None)
        measured = [(g, best(probe, g)) for g in geometries]
        helpful = [(g, q) for g, q in measured if q is None or baseline is None or q > baseline]
        helpful = sorted(helpful, key=lambda item: (item[1] is None, -(item[1] or 0.0)))
        others = sorted((f for f in families if f != probe), key=lambda f: -(best(f, None) or 0.0))
        q_best = max((t.values[0] for t in done), default=None)

        def could_lead(family: str, gained: float | None) -> bool:
            default = best(family, None)
            return None in (default, gained, q_best) or default + gained >= q_best - ALLOCATION_TEMPERATURE

        return probing + [(f, g) for g, q in helpful for f in others if self._takes(f, g)
                          and could_lead(f, None if q is None or baseline is None else q - baseline)]

    def _default_params(self, family: str, geometry: dict | None = None) -> dict:
        """``family``'s default configuration, with ``geometry`` unless None."""
        return self._with_weights({**self.defaults[family], **({"geometry": geometry} if geometry else {})})

    def _default_cost(self, family: str, geometry: dict | None, rung: int = 0) -> float:
        """Predicted seconds of ``family``'s default (with ``geometry`` unless None) at fidelity ``rung``."""
        return plan_trial(self.predictor, self.sizes, family, self._default_params(family, geometry), math.inf,
                          rung).prediction.total_s

    def _geometry_start(self, trial, family: str, geometry: dict, rung: int | None, share: float = 1.0) -> dict:
        trial.set_user_attr("geometry_start", [family, _geometry_key(geometry)])
        return self._planned(trial, family, self._default_params(family, geometry), False, rung, share)

    def _start_fits(self, family: str, geometry: dict, complete: bool) -> bool:
        """Whether a later warm-start geometry trial fits the time left at some fidelity. One that does not is
        passed over, not recorded: at the end of a ball_screw search such skips made 6 of its 7 "failed" trials."""
        if self._screening_plan(family, self._default_params(family, geometry), self._cap(complete)).skip is None:
            return True
        key = (family, _geometry_key(geometry))
        if key not in self._passed_over:
            self._passed_over.add(key)
            logging.getLogger(__name__).info("passing over %s with %s: no fidelity fits the time left", *key)
        return False

    def _takes(self, family: str, geometry: dict | None) -> bool:
        """Whether ``family``'s space searches ``geometry``."""
        return any(p.name == "geometry" and geometry in p.choices for p in self.spaces[family].parameters)

    # --- fidelity and time limits -----------------------------------------------------------------------------
    def _cap(self, complete: bool) -> float:
        """Seconds a trial may run: the remaining budget, less the fallback reserve until some trial completed (a
        share of the remaining budget, at least what the cheapest candidate is predicted to need), and at most the
        user's --trial-timeout."""
        remaining = max(0.0, self.deadline - time.monotonic() - SEARCH_END_TAIL_S)
        cap = remaining
        if not complete:
            cheapest = min((self._cheapest(f).prediction.total_s for f in self.order), default=0.0)
            cap = remaining - max(SEARCH_FALLBACK_RESERVE * remaining, cheapest)
        return min(cap, self.request.trial_timeout_s) if self.request.trial_timeout_s else cap

    def _screening_plan(self, family: str, params: dict, cap: float) -> TrialPlan:
        """The highest fidelity at which the remaining budget still affords SEARCH_CONFIGS_PER_BUDGET
        configurations (an iterative family trains fewer epochs first); the lowest rung, in the trial's cap, when
        none does. The epochs fit that share too, not the cap: on magnetic_tile a screening STPM that fitted no
        rung in it trained 56 epochs on 1/9 of the images for 420 s, longer than its default on all of them."""
        room = max(0.0, self.deadline - time.monotonic()) * self.parallel / SEARCH_CONFIGS_PER_BUDGET
        plan = plan_trial(self.predictor, self.sizes, family, params, cap, within_s=room)
        return plan if plan.skip is None else \
            plan_trial(self.predictor, self.sizes, family, params, cap, rungs(self.sizes.train_images)[-1])

    def _planned(self, trial, family: str, params: dict, default: bool, rung: int | None,
                 share: float = 1.0) -> dict:
        """The configuration at the highest fidelity (from ``rung``; None: the screening rung) that fits, in at most
        ``share`` of the remaining time."""
        complete = bool(_complete(trial.study.get_trials(deepcopy=False)))
        whole = self._cap(complete)
        cap = min(whole, share * max(0.0, self.deadline - time.monotonic() - SEARCH_END_TAIL_S))

        def plan_within(limit: float) -> TrialPlan:
            return self._screening_plan(family, params, limit) if rung is None else \
                plan_trial(self.predictor, self.sizes, family, params, limit, rung)

        plan = plan_within(cap)
        if plan.skip is not None and cap < whole:  # the share fits nothing: the whole cap
            plan = plan_within(whole)
        if plan.skip is not None and not complete and self._is_cheapest(family):  # what the reserve is kept for
            plan = plan_within(self._cap(True))
        return self._config(trial, family, params, default, plan)

    def _config(self, trial, family: str, params: dict, default: bool, plan: TrialPlan) -> dict:
        """The trial's configuration from its plan (a skip record when nothing fits), its attributes set."""
        trial.set_user_attr("family", family)
        trial.set_user_attr("default", default)
        trial.set_user_attr("params", params)
        if plan.skip is not None:
            trial.set_user_attr("skipped", True)
            return {"family": family, "params": params, "default": default, "skip": plan.skip,
                    "skip_reason": plan.skip_reason}
        trial.set_user_attr("rung", plan.fidelity.rung)
        if plan.fidelity.epochs is not None:
            params = {**params, "epochs": plan.fidelity.epochs}
        if plan.fidelity.batch_size is not None:
            params = {**params, "batch_size": plan.fidelity.batch_size}
        return {"family": family, "params": params, "default": default, "fidelity": plan.fidelity.to_dict(),
                "timeout_s": plan.limit_s, "predicted_s": plan.prediction.total_s,
                "search_ends_in_s": self.deadline - time.monotonic() - SEARCH_END_TAIL_S / 2,
                "prediction_basis": plan.prediction.basis}

    def _is_cheapest(self, family: str) -> bool:
        return family == min(self.order, key=lambda f: self._cheapest(f).prediction.total_s)

    def _cheapest(self, family: str) -> TrialPlan:
        """The family's default at its lowest fidelity, with all the remaining time."""
        return plan_trial(self.predictor, self.sizes, family, self._default_params(family),
                          self._cap(True), max(rungs(self.sizes.train_images)))

    def _fallback(self, trial, earlier) -> dict:
        """Nothing has completed and something failed: the candidate predicted cheapest (family default, lowest
        fidelity) that fits the remaining time runs next; each failure of a family doubles its cost here, so a
        family that fails for another reason than time does not take every turn."""
        plans = {f: self._cheapest(f) for f in self.order}
        fitting = [f for f in self.order if plans[f].skip is None]
        if not fitting:
            return self._give_up(trial, f"no family fits the remaining budget: {plans[self.order[0]].skip}")
        failures = {f: sum(_failed(t) and t.user_attrs.get("family") == f and not t.user_attrs.get("interrupted")
                           for t in earlier) for f in fitting}
        family = min(fitting, key=lambda f: plans[f].prediction.total_s * 2 ** failures[f])
        return self._planned(trial, family, self._default_params(family), True,
                             plans[family].fidelity.rung)

    def _give_up(self, trial, skip: str, skip_reason: str = "predicted too slow") -> dict:
        """The search's last proposal: a skip record saying why it stops (``exhausted`` ends the search)."""
        self.exhausted = True
        family = self.order[0]
        trial.set_user_attr("family", family)
        trial.set_user_attr("default", False)
        trial.set_user_attr("skipped", True)
        return {"family": family, "params": dict(self.defaults[family]), "default": False, "skip": skip,
                "skip_reason": skip_reason}

    def _fits_at(self, family: str, params: dict, rung: int, complete: bool) -> bool:
        """Whether ``params`` fit the time a trial may have now at fidelity ``rung`` (not a lower one)."""
        plan = plan_trial(self.predictor, self.sizes, family, params, self._cap(complete), rung)
        return plan.skip is None and plan.fidelity.rung == rung

    def _promotions(self, earlier) -> list[tuple[int, str, dict, int]]:
        """Completed screening trials (the quick look's defaults excepted) not yet promoted that are in the top 1/η
        of their rung (ASHA's rule: one per η trials there) or already beat every full-fidelity trial (fewer
        training images rarely flatter a model): (number, family, parameters, next rung up), lowest rung first.
        Before any trial completed at full fidelity, only the best screening trial so far (the quick look's
        included) counts as beating them: on ball_screw a template screened at 0.62 was otherwise promoted to all
        images, ahead of every other default, while PatchCore's quick look had 0.81."""
        promoted = {t.user_attrs.get("promoted_from") for t in earlier}
        complete = _complete(earlier)
        done = [t for t in complete if t.user_attrs.get("rung", 0) > 0 and "params" in t.user_attrs
                and not (t.user_attrs.get("quick_look") and not t.user_attrs.get("geometry_start"))]
        full = [t.values[0] for t in complete if not t.user_attrs.get("rung")]

        def beats_full(quality: float) -> bool:
            return quality > max(full) if full else quality >= max(t.values[0] for t in complete)

        candidates = []
        for rung in sorted({t.user_attrs["rung"] for t in done}):
            at_rung = sorted((t for t in done if t.user_attrs["rung"] == rung), key=lambda t: -t.values[0])
            top = len(at_rung) // SEARCH_REDUCTION_FACTOR
            candidates += [(t.number, t.user_attrs["family"], t.user_attrs["params"], rung - 1)
                           for i, t in enumerate(at_rung)
                           if (i < top or beats_full(t.values[0])) and t.number not in promoted]
        return candidates

    def _with_weights(self, params: dict) -> dict:
        """A local weights file for the chosen backbone, when the user supplied one."""
        local = self.request.backbone_weights.get(params.get("backbone"))
        return {**params, "weights": local} if local else params

    def weights(self, earlier, families: list[str] | None = None) -> np.ndarray:
        from optuna.trial import TrialState

        order = families or self.order
        done = [t for t in _complete(earlier) if not t.user_attrs.get("rung")]  # full fidelity: comparable
        best = {f: max((t.values[0] for t in done if t.user_attrs.get("family") == f), default=None)
                for f in order}
        q_best = max((q for q in best.values() if q is not None), default=None)
        share = dict.fromkeys(order, 0.0)
        if done:
            ranks = pareto_ranks(np.array([t.values for t in done]), OBJECTIVE_MODES)
            front = [t.user_attrs.get("family") for t, r in zip(done, ranks) if r == 0]
            for f in front:
                if f in share:
                    share[f] += 1 / len(front)
        failures = {f: sum(t.state == TrialState.FAIL and t.user_attrs.get("family") == f
                           and not t.user_attrs.get("interrupted") for t in earlier) for f in order}
        weights = []
        for f in order:
            prior = self.request.priors.get(f, 0.5)
            fit = 1.0 if best[f] is None else math.exp((best[f] - q_best) / ALLOCATION_TEMPERATURE) + share[f]
            weights.append(prior * fit * 0.5 ** failures[f])
        weights = np.asarray(weights)
        return weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))

    def _pick_family(self, trial, earlier, families: list[str] | None = None) -> str:
        order = families or self.order
        rng = np.random.default_rng([self.request.seed, trial.number])
        return order[int(rng.choice(len(order), p=self.weights(earlier, order)))]


def _geometry_key(geometry: dict) -> str:
    """A geometry as the text its warm-start trials record (``geometry_start``)."""
    return json.dumps(geometry, sort_keys=True)


def _complete(trials) -> list:
    """Optuna trials that finished with every objective measured."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state == TrialState.COMPLETE and t.values and None not in t.values]


def _failed(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL or bool(trial.user_attrs.get("skipped"))


# --- one trial in a worker ----------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the trial process is killed when the thread that started it ends (e.g. the trial was stopped)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_trial_process(config: dict, work_dir: str, data_file: str, metric: str, timeout_s: float,
                      threads: int, cache_dir: str, report) -> dict:
    """Run one configuration in a child process, relaying its intermediate quality to ``report``."""
    trial_id = config["trial_id"]
    out_dir = Path(work_dir) / "trials" / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"family": config["family"], "params": config["params"], "data_file": data_file, "metric": metric,
            "timeout_s": timeout_s, "threads": threads, "out_dir": str(out_dir),
            "report_every": SEARCH_REPORT_EVERY, "trial_id": trial_id, "search": config.get("search"),
            "default": bool(config.get("default")), "rerun_of": config.get("rerun_of"),
            "fidelity": config.get("fidelity"), "false_alarm_rate": config.get("false_alarm_rate")}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    parent = os.getppid()  # in a Ray worker: its node's raylet
    env = {**os.environ, FEATURE_CACHE_ENV: cache_dir, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    stderr = (out_dir / "stderr.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "automl_ad.search.trial", str(out_dir / "spec.json")],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                               preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    expired = threading.Event()

    def kill_after_limit() -> None:
        expired.set()
        process.kill()

    # iterative families check the limit every epoch; this hard limit also covers one long, non-iterative fit
    hard_limit_s = timeout_s * 1.2 + 60
    if config.get("search_ends_in_s") is not None:  # killed, and recorded, before the search ends
        hard_limit_s = max(1.0, min(hard_limit_s, float(config["search_ends_in_s"])))
    hard_limit = threading.Timer(hard_limit_s, kill_after_limit)
    hard_limit.start()
    final = None
    try:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "epoch" and event.get("quality") is not None:
                report({"epoch": event["epoch"], "quality": event["quality"], "loss": event["loss"],
                        "resource": resource(config.get("fidelity"), event["epoch"])})
            elif event.get("event") in ("result", "failed"):
                final = event
        process.wait()
    finally:
        hard_limit.cancel()
        if process.poll() is None:
            process.kill()
        stderr.close()
    if final is None:  # killed, or crashed before it could report its own error
        if process.returncode == -signal.SIGKILL and not expired.is_set() and _parent_gone(parent):
            os._exit(1)  # the whole node is being taken down: Ray records this worker as lost, not an OOM kill
        final = unreported_failure(process.returncode, (out_dir / "stderr.log").read_text(errors="replace"),
                                   hard_limit_s if expired.is_set() else None)
        final["error"] += f" (its output: {out_dir / 'stderr.log'})"
    if final["event"] == "failed":
        (out_dir / "failure.json").write_text(json.dumps(final))
        raise TrialFailed(f"{final['reason']}: {final['error']}")
    final.update(throughput=final["throughput_ips"], memory_mb=final["peak_rss_mb_score"],
                 resource=resource(config.get("fidelity"), final.get("epochs_trained")))
    return final


def _parent_gone(parent: int, grace_s: float = SEARCH_NODE_LOSS_GRACE_S) -> bool:
    """Whether this process's parent (a Ray worker's raylet) ends within ``grace_s``: its node is going down."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            return True
        time.sleep(0.05)
    return False


def resource(fidelity: dict | None, epoch: int | None) -> float:
    """Progress through the configuration's own full-fidelity schedule, in percent (the schedulers' time axis):
    its share of the training images × the share of its epochs done."""
    if not fidelity:
        return 100.0
    done = (epoch / fidelity["full_epochs"]) if fidelity.get("full_epochs") and epoch is not None else 1.0
    return 100.0 * fidelity["train_fraction"] * min(1.0, done)


class TrialFailed(RuntimeError):
    """A configuration failed; the search records it and goes on."""


def _trainable(config: dict, work_dir: str, data_file: str, metric: str, timeout_s: float, threads: int,
               cache_dir: str, search_id: str, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE):
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(work_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    _write_json(trial_dir / NODE_FILE, {"node_id": ray.get_runtime_context().get_node_id(),
                                        "host": socket.gethostname()})
    config = {**config, "trial_id": trial_id, "search": search_id, "false_alarm_rate": false_alarm_rate}
    if config.get("skip"):  # predicted not to finish, or not planned (see Proposer): recorded, never started
        reason = config.get("skip_reason", "predicted too slow")
        _write_json(trial_dir / "failure.json", {"event": "failed", "reason": reason, "error": config["skip"]})
        raise TrialFailed(f"{reason}: {config['skip']}")
    timeout_s = float(config.get("timeout_s") or timeout_s)
    result = run_trial_process(config, work_dir, data_file, metric, timeout_s, threads, cache_dir, tune.report)
    tune.report({k: v for k, v in result.items() if k not in ("event", "heatmaps")}
                | {"heatmaps": json.dumps(result.get("heatmaps", []))})


# --- the search ---------------------------------------------------------------------------------------------------
#: Ray's switch between its one-machine mode (every Ray server on 127.0.0.1) and its cluster mode (servers on the
#: machine's network address, for other nodes to reach); Ray reads it once, when it is first imported.
RAY_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray that only this machine can reach.

    A local Ray binds its GCS, raylet, object manager, agents and workers to 127.0.0.1. Ray does so only in its
    one-machine mode (otherwise it turns a node address of 127.0.0.1 into the machine's network address and
    listens on all interfaces), so that mode is switched on before ray is imported.
    """
    if address is None:
        os.environ[RAY_CLUSTER_MODE_ENV] = "0"
    # a trial that fails as the search ends leaves its error unread; SearchCallback records it, so Ray need not
    # print its traceback on the console
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}} if address else None)
    node_ip = None if address else ray.util.get_node_ip_address()
    if node_ip is not None and not ipaddress.ip_address(node_ip).is_loopback:
        ray.shutdown()
        raise UsageError(f"a local Ray would listen on {node_ip}, reachable from the network: ray was imported "
                         f"before the search without {RAY_CLUSTER_MODE_ENV}=0. Set that variable before importing "
                         "ray, start Ray yourself (ray.init), or give a cluster --address")


def _concurrency() -> tuple[int, dict, int]:
    """(parallel trials, resources per trial, threads per trial) from the CPUs and GPUs of the Ray nodes.

    Every trial gets the same threads, so latencies compare: up to 4, and no more than the smallest node has (per
    GPU on GPU nodes), so that a trial fits on every node; each node runs as many trials as it has room for.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise UsageError("the Ray cluster has no live node with a CPU to run trials on; start one with "
                         "`ray start --address HEAD:PORT --num-cpus N`")
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    if gpu_nodes:
        threads = min([4] + [int(r["CPU"] // r["GPU"]) or 1 for r in gpu_nodes])
        resources = {"cpu": threads, "gpu": 1}
        return sum(_trials_on(r, resources) for r in gpu_nodes), resources, threads
    threads = min([4] + [int(r["CPU"]) for r in nodes])
    return sum(_trials_on(r, {"cpu": threads}) for r in nodes), {"cpu": threads}, threads


def _trials_on(node: dict, resources: dict) -> int:
    """Trials of ``resources`` (threads, and one GPU when given) a node's Ray resources run at once."""
    trials = int(node.get("CPU", 0)) // resources["cpu"]
    return min(trials, int(node.get("GPU", 0))) if resources.get("gpu") else trials


def _memory_per_trial(resources: dict) -> float | None:
    """Bytes one trial may use: the least, over the Ray nodes, of the memory Ray gives tasks there (most of what was
    available when it started) shared by the trials the node runs at once; None when Ray reports none."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    shares = [node["memory"] / _trials_on(node, resources) for node in nodes
              if node.get("memory") and _trials_on(node, resources) >= 1]
    return min(shares) if shares else None


def check_search_limits(budget_s, max_trials, trial_timeout_s, resume: bool = False) -> None:
    """Refuse a budget, trial time limit or trial count a search cannot honour, saying what to give instead.
    ``budget_s`` may be None when resuming (the search keeps its own budget)."""
    longest = f"{SEARCH_MAX_BUDGET_S / 86400:g} days ({SEARCH_MAX_BUDGET_S:.0f} s)"
    for option, value in (("--budget", budget_s), ("--trial-timeout", trial_timeout_s)):
        if value is None and (option == "--trial-timeout" or resume):
            continue
        if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                or not 0 < value <= SEARCH_MAX_BUDGET_S):
            raise UsageError(f"{option} must be a positive, finite duration of at most {longest}; got {value!r} s. "
                             "Give e.g. --budget 8h or --trial-timeout 900")
    if max_trials is not None and (not isinstance(max_trials, numbers.Integral) or isinstance(max_trials, bool)
                                   or max_trials < 1):
        raise UsageError(f"--max-trials must be at least 1, got {max_trials!r}; leave it out to let the budget alone "
                         "end the search")


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
        state = _resume_state(work_dir, request, uri) if request.resume else None
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
        files = [snapshot, data_file] + [Path(p) for p in (request.profile_file, request.recommendation_file) if p]
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
        reruns = _interrupted_trials(work_dir, state["parent_run_id"], tracker, experiment_id, request.routes)
        if reruns:
            say(f"{len(reruns)} trial(s) were running when this search was stopped: recorded as failed "
                f"({INTERRUPTED}) and run again: {', '.join(r['trial_id'] for r in reruns)}")
    parent = state["parent_run_id"]
    state_file = _state_file(work_dir, parent)
    _write_json(state_file, state)
    remaining = state["budget_s"] - state["elapsed_s"]
    say(f"Search {parent} on {dataset.root} ({search_data.describe()}); families {', '.join(request.families)}; "
        f"budget left {remaining:.0f} s; tracking {tracker.uri}")
    if remaining <= 0:
        raise UsageError(f"search {parent} has used its budget of {state['budget_s']:.0f} s; start a new search "
                         "(without --resume) or give a larger --budget")
    checkpoint = _ElapsedCheckpoint(state_file, state)
    try:
        cut_short = _tune(request, spaces, defaults, work_dir, data_file, state, remaining, tracker, experiment_id,
                          reruns, console, trial_sizes(search_data, request.families))
    finally:
        checkpoint.stop()
    if cut_short:
        say(f"the search was stopped after {state['elapsed_s']:.0f} s of its {state['budget_s']:.0f}-s budget "
            f"(interrupted): `automl-ad search {dataset.root} --resume` from this folder continues it with the rest")
    _keep_a_model(tracker, parent, state["elapsed_s"], say)
    front = tracker.tag_front(parent)
    _log_best_quality_plot(tracker, parent)
    for run in front:
        model = work_dir / "trials" / run.data.tags["trial"] / "model"
        if model.is_dir() and not tracker.has_model(run.info.run_id):
            tracker.log_model(run.info.run_id, model)
    state["finished"] = state["elapsed_s"] >= state["budget_s"] - 1 or request.max_trials is not None
    _write_json(state_file, state)
    tracker.finish_search(parent)
    if search_data.synthetic_reference is not None:  # last: stopping it loses nothing of the search
        _compare_on_synthetic(tracker, parent, work_dir, search_data.synthetic_reference, request, say)
    records = SearchStore(tracker=tracker).trials(parent)
    return SearchResult(parent, experiment_name(dataset), tracker.uri, [t.row() for t in records],
                        [t.row() for t in records if t.complete and t.on_front], str(work_dir))


def _keep_a_model(tracker, parent: str, elapsed_s: float, say) -> None:
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
            say("no trial completed within the budget: there is no model to export; give a larger --budget")
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


def _state_file(work_dir: Path, parent: str) -> Path:
    """Resume state of one search: its parent run, Optuna study, budget and time spent."""
    return work_dir / "searches" / f"{parent}.json"


def _resume_state(work_dir: Path, request: SearchRequest, uri: str) -> dict:
    """State of the newest search of this dataset started from this working directory into store ``uri``."""
    states = []
    for path in sorted((work_dir / "searches").glob("*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the resume state {path}: {exc}. Delete it to resume an older search, or "
                             "start a new search without --resume") from None
    if not states:
        raise UsageError(f"nothing to resume: no earlier search of this dataset was started from this working "
                         f"directory (no resume state under {work_dir / 'searches'}); run without --resume")
    here = [s for s in states if s.get("tracking_uri") == uri]
    if not here:
        stores = ", ".join(sorted({str(s.get("tracking_uri")) for s in states}))
        raise UsageError(f"nothing to resume in the tracking store {uri}: the earlier searches of this dataset from "
                         f"this working directory were recorded in {stores}; pass that with --tracking-uri")
    state = max(here, key=lambda s: s.get("created", 0.0))
    if request.budget_s and request.budget_s > state["budget_s"]:
        state["budget_s"] = request.budget_s
    return state


def _interrupted_trials(work_dir: Path, parent: str, tracker, experiment_id: str, routes: dict) -> list[dict]:
    """Trials of search ``parent`` that a killed search process lost, to run again (their specs, oldest first).

    A trial that started (its spec is in the work folder) but has no MLflow run was running when the process died:
    it is recorded now as failed with reason ``INTERRUPTED``. Interrupted trials not yet run again are returned.
    """
    specs = {}
    for path in sorted((work_dir / "trials").glob("*/spec.json"), key=lambda p: p.stat().st_mtime):
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # cut short by the kill while being written: that trial had not started
        if spec.get("search") == parent:
            specs[path.parent.name] = spec
    recorded = {r.data.tags.get("trial"): r.data.tags.get("failure_reason") for r in tracker.trials(parent)}
    for trial_id, spec in specs.items():
        if trial_id not in recorded:
            tracker.log_trial(experiment_id, parent, {
                "trial_id": trial_id, "family": spec["family"], "params": spec["params"], "default": spec["default"],
                "route": routes.get(spec["family"], ""), "status": "failed", "reason": INTERRUPTED,
                "error": "the search process ended while this trial was running; `--resume` runs it again"}, [])
            recorded[trial_id] = INTERRUPTED
    run_again = {spec.get("rerun_of") for spec in specs.values()}
    return [{**spec, "trial_id": trial_id} for trial_id, spec in specs.items()
            if recorded[trial_id] == INTERRUPTED and trial_id not in run_again]


class _ElapsedCheckpoint:
    """Saves a running search's state with the time spent so far, every ``SEARCH_CHECKPOINT_EVERY_S`` and at stop."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self._spent_before, self._started = state["elapsed_s"], time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(SEARCH_CHECKPOINT_EVERY_S):
            self.save()

    def save(self) -> None:
        self.state["elapsed_s"] = self._spent_before + time.monotonic() - self._started
        _write_json(self.path, self.state)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.save()


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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


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
    parallel, resources, threads = _concurrency()
    if resources.get("gpu") and request.device != "cpu":  # int8 runs through ONNX Runtime on CPU only
        spaces = {family: space.for_gpu() for family, space in spaces.items()}
    storage = optuna.storages.RDBStorage(f"sqlite:///{work_dir / 'optuna.db'}",
                                         engine_kwargs={"connect_args": {"timeout": 30}})
    _fail_stale_trials(storage, state["study"])
    sampler = optuna.samplers.TPESampler(seed=request.seed, multivariate=True, group=True, constant_liar=True,
                                         n_startup_trials=max(4, len(request.families)))
    deadline = time.monotonic() + remaining
    traits = family_traits(request.families)
    predictor = CostPredictor(traits, threads=threads, device="cuda" if resources.get("gpu") else "cpu",
                              memory_per_trial_bytes=_memory_per_trial(resources))
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
    trainable = tune.with_parameters(_trainable, work_dir=str(work_dir), data_file=str(data_file),
                                     metric=request.metric, timeout_s=remaining, threads=threads,
                                     cache_dir=str(Path(os.environ.get(FEATURE_CACHE_ENV) or default_cache_dir())),
                                     search_id=state["parent_run_id"], false_alarm_rate=request.false_alarm_rate)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=family_scheduler(), num_samples=max_trials,
                                    max_concurrent_trials=parallel, time_budget_s=remaining),
        run_config=tune.RunConfig(name=f"{state['study']}-{int(time.time())}", storage_path=str(work_dir / "ray"),
                                  callbacks=[callback], verbose=0, stop=_stop_when(proposer),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    try:
        tuner.fit()
    finally:
        callback.close()
    # Ray Tune ends on Ctrl+C as on its budget; neither the budget, the trial count nor the stopper ended it here
    return max_trials < 0 and not proposer.exhausted and time.monotonic() < deadline - SEARCH_END_TAIL_S


def _fail_stale_trials(storage, study_name: str) -> None:
    """Trials left RUNNING by a killed search are marked FAIL (so the sampler does not wait for them) and
    ``interrupted`` (so they count neither as a family's failure nor as its default having run)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


# --- budget-aware scheduling --------------------------------------------------------------------------------------
def family_traits(families: list[str]) -> dict[str, FamilyTraits]:
    """Cost-model route, iterative training, default epochs, extra fit seconds, peak memory and default batch size
    of each family (what the cost predictor needs)."""
    from automl_ad.detectors import detector_class

    traits = {}
    for family in families:
        cls = detector_class(family)
        epochs = getattr(cls(), "epochs", None) if cls.iterative else None
        batch = getattr(cls(), "batch_size", None) if cls.iterative else None
        traits[family] = FamilyTraits(cls.route, bool(cls.iterative), epochs if isinstance(epochs, int) else None,
                                      cls.extra_fit_seconds, cls.peak_memory_bytes,
                                      batch if isinstance(batch, int) else None)
    return traits


def trial_sizes(search_data, families: list[str]) -> TrialSizes:
    """Training and validation image counts of a search, the sizes of some of its images (headers only) and their
    mean, and the families' network pixels per input."""
    from PIL import Image

    from automl_ad.detectors import detector_class

    images = search_data.train
    sizes = []
    for i in range(0, len(images), max(1, len(images) // SEARCH_SIZE_SAMPLES)):
        if images.arrays is not None:
            sizes.append(tuple(images.arrays[i].shape[:2]))
        else:
            with Image.open(images.paths[i]) as image:
                sizes.append((image.height, image.width))
    height, width = np.mean(sizes, axis=0) if sizes else (256.0, 256.0)
    screened = screening_validation(search_data.validation)
    return TrialSizes(len(search_data.train), len(search_data.validation), (float(height), float(width)),
                      None if screened is None else len(screened),
                      {f: detector_class(f).scoring_pixels for f in families}, tuple(sizes))


def family_scheduler():
    """ASHA per family on each trial's ``resource`` (percent of its own full-fidelity schedule): rungs at 1/η³,
    1/η², 1/η of every family's own epochs, so a family that rises slowly is compared only with itself."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    def make() -> ASHAScheduler:
        # stop_last_trials=False: a trial reporting its last epoch (resource 100) goes on to validate and report
        return ASHAScheduler(time_attr="resource", metric="quality", mode="max", max_t=100,
                             grace_period=100 / SEARCH_REDUCTION_FACTOR ** 3, reduction_factor=SEARCH_REDUCTION_FACTOR,
                             stop_last_trials=False)

    class FamilyASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.per_family: dict[str, ASHAScheduler] = {}

        def _of(self, trial) -> ASHAScheduler:
            family = trial.config.get("family", "")
            if family not in self.per_family:
                self.per_family[family] = make()
            return self.per_family[family]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self._of(trial).on_trial_error(tune_controller, trial)

        def debug_string(self) -> str:
            return "; ".join(f"{f}: {s.debug_string()}" for f, s in self.per_family.items())

    return FamilyASHA()


def _stop_when(proposer: Proposer):
    """A Tune stopper that ends the search once no family fits the remaining budget."""
    from ray import tune

    class NothingFits(tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return proposer.exhausted

    return NothingFits()
