"""How trials are proposed (define-by-run, :class:`Proposer`):

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
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np

from automl_ad.defaults import (
    SEARCH_CONFIGS_PER_BUDGET,
    SEARCH_END_TAIL_S,
    SEARCH_FALLBACK_RESERVE,
    SEARCH_QUICK_LOOK_FULL_COST,
    SEARCH_QUICK_LOOK_SHARE,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_SIZE_SAMPLES,
)
from automl_ad.evaluation.objectives import OBJECTIVE_MODES, pareto_ranks
from automl_ad.search.cost_predictor import CostPredictor, FamilyTraits, TrialPlan, TrialSizes, plan_trial, rungs
from automl_ad.search.request import SearchRequest
from automl_ad.search.validation import screening_validation

ALLOCATION_TEMPERATURE = 0.05


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
        ``share`` of the remaining time. When the share fits nothing, twice the share, and so on up to the whole cap:
        the least time something fits in, so a family predicted dearer never trains more (planned in the whole cap at
        once, an STPM default predicted at 158 s trained 67 epochs where one predicted at 27 s trained 9)."""
        complete = bool(_complete(trial.study.get_trials(deepcopy=False)))
        whole = self._cap(complete)
        cap = min(whole, share * max(0.0, self.deadline - time.monotonic() - SEARCH_END_TAIL_S))

        def plan_within(limit: float) -> TrialPlan:
            return self._screening_plan(family, params, limit) if rung is None else \
                plan_trial(self.predictor, self.sizes, family, params, limit, rung)

        plan = plan_within(cap)
        while plan.skip is not None and cap < whole:
            cap = min(whole, 2 * cap) if cap > 0 else whole
            plan = plan_within(cap)
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
    """Training and validation image counts of a search (the validation a family is ranked on: with synthetic
    anomalies, as many as there are normal images, not all the kinds' rounds), the sizes of some of its images
    (headers only) and their mean, and the families' network pixels per input."""
    from PIL import Image

    from automl_ad.data.synthetic import without_trained_kinds
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
    validation = without_trained_kinds(search_data.validation, ())
    screened = screening_validation(validation)
    return TrialSizes(len(search_data.train), len(validation), (float(height), float(width)),
                      None if screened is None else len(screened),
                      {f: detector_class(f).scoring_pixels for f in families}, tuple(sizes))
