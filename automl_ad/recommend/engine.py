"""Score every route for a dataset profile and constraints: report scores weighted by priorities + rules; propose
the input geometry and the backbones that have weights on this machine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from automl_ad.constraints import PRIORITY_DIMENSIONS, ConstraintProfile
from automl_ad.defaults import SHORTLIST_SIZE, SHORTLIST_TIE_POINTS
from automl_ad.detectors import detector_class
from automl_ad.errors import UsageError
from automl_ad.features.backbone import BackboneWeightsError, backbone_of_weights, hub_reachable, weights_available
from automl_ad.knowledge import load_knowledge
from automl_ad.profiling import DatasetProfile
from automl_ad.recommend.cost import CostEstimate, cost_model, estimate_route
from automl_ad.recommend.geometry import propose_geometry

_STRUCTURE_FACTS = {"kind", "periodic", "aligned", "per_position_aligned"}
_REPORT_RELIABILITY, _DERIVED_RELIABILITY = 0.85, 0.6


@dataclass(frozen=True)
class Adjustment:
    """One rule's effect on one route."""

    rule: str
    effect: str  # "exclude" or "adjust"
    points: float
    reason: str
    evidence: str


@dataclass
class RouteCandidate:
    """A route's standing for this dataset and these constraints."""

    route: str
    name: str
    branch: str
    score: float
    base_score: float
    confidence: float
    basis: str
    excluded: bool
    shortlisted: bool
    reasons_for: list[str]
    reasons_against: list[str]
    adjustments: list[Adjustment]
    families: list[str]
    backbone: str | None
    resolution: int  # network input side (the proposed geometry's for backbone routes)
    estimated_latency_ms: float


@dataclass
class Recommendation:
    """The ranked, explained list of all routes; ``shortlist`` holds the routes a search would try; ``geometry`` the
    proposed input geometry with its reasons (:class:`~automl_ad.recommend.geometry.GeometryProposal`);
    ``backbones`` those with weights here, light to heavy, and ``backbone_note`` where their weights come from."""

    dataset: str
    fingerprint: str
    constraints: str
    facts: dict
    scenario: dict
    candidates: list[RouteCandidate]
    shortlist: list[str] = field(default_factory=list)
    geometry: dict = field(default_factory=dict)
    backbones: list[str] = field(default_factory=list)
    backbone_note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def candidate(self, route: str) -> RouteCandidate:
        return next(c for c in self.candidates if c.route == route)

    def rank(self, route: str) -> int:
        """1-based position of ``route`` in the ranking."""
        return [c.route for c in self.candidates].index(route) + 1


@lru_cache(maxsize=1)
def load_rules() -> dict:
    """The rules file (``rules.yaml``), parsed once."""
    return yaml.safe_load(resources.files("automl_ad.recommend").joinpath("rules.yaml").read_text())


def _holds(value, condition, facts: dict) -> bool:
    """Does ``value`` satisfy ``condition`` (a literal or a mapping of operators)?"""
    if not isinstance(condition, dict):
        return value == condition
    for op, target in condition.items():
        if op.endswith("_fact"):
            op, target = op[: -len("_fact")], facts.get(target)
        if op == "ne":
            ok = value != target
        elif op == "eq":
            ok = value == target
        elif op == "in":
            ok = value in target
        elif value is None or target is None:
            ok = False
        else:
            ok = {"lt": value < target, "le": value <= target, "gt": value > target, "ge": value >= target}[op]
        if not ok:
            return False
    return True


def _matches(selector: dict, route_facts: dict, facts: dict) -> bool:
    for key, condition in selector.items():
        if key in ("score", "requirement", "estimate"):
            if not all(_holds(route_facts[key].get(name), cond, facts) for name, cond in condition.items()):
                return False
        elif not _holds(route_facts.get(key), condition, facts):
            return False
    return True


def _families_left_out(family_rules: list[dict], facts: dict) -> dict[str, str]:
    """Family → why it is left out of its route, for the family rules whose conditions hold."""
    return {family: _fill(rule["reason"], facts, {}) for rule in family_rules
            if all(_holds(facts.get(k), c, facts) for k, c in rule["when"].items()) for family in rule["families"]}


def _fill(template: str, facts: dict, route_facts: dict) -> str:
    values = {**facts, **route_facts}
    return template.format_map({k: _display(v) for k, v in values.items()})


def _display(value):
    if isinstance(value, dict):
        return {k: _display(v) for k, v in value.items()}
    if isinstance(value, float):
        return f"{value:g}" if value == int(value) else f"{value:.2f}".rstrip("0")
    return value


def gather_facts(profile: DatasetProfile, constraints: ConstraintProfile) -> dict:
    """Dataset facts (with the constraint profile's overrides) plus the deployment facts rules refer to."""
    data = profile.with_overrides(constraints.data) if constraints.data else profile
    return {
        **data.facts(),
        "alignment_score": profile.alignment.score,
        "device": constraints.hardware.device,
        "cpu_cores": constraints.hardware.cpu_cores,
        "latency_ms": constraints.effective_latency_ms,
        "localization": constraints.localization,
        "max_model_mb": constraints.max_model_mb,
        "training_time_s": constraints.training_time_s,
    }


def _route_facts(route, estimate: CostEstimate) -> dict:
    requirements = route.requirements
    if dataclasses.is_dataclass(requirements):
        requirements = dataclasses.asdict(requirements)
    return {
        "route": route.key,
        "branch": route.branch,
        "sub_branch": route.sub_branch,
        "localization": route.localization,
        "needs_training": route.needs_training,
        "score": {dim: s.value for dim, s in route.scores.items()},
        "requirement": dict(requirements),
        "estimate": {"latency_ms": estimate.latency_ms, "latency_ratio": estimate.latency_ratio},
    }


def _base_score(route, priorities: dict[str, float]) -> tuple[float, str, list[str], list[str], bool]:
    """Priority-weighted mean of the route's scores, how it was formed, and the strongest/weakest dimensions."""
    weights: dict[str, float] = {}
    for priority, weight in priorities.items():
        dimension = PRIORITY_DIMENSIONS[priority]
        weights[dimension] = weights.get(dimension, 0.0) + weight
    used = {d: w for d, w in weights.items() if w > 0}
    base = sum(route.scores[d].value * w for d, w in used.items()) / sum(used.values())
    heaviest = max(used.values())
    pros, cons = [], []
    for dimension, weight in sorted(used.items(), key=lambda item: -item[1]):
        score = route.scores[dimension]
        label = dimension.replace("_", " ")
        origin = "estimate from the report's text" if score.derived else "report"
        if weight < 0.5 * heaviest:
            continue
        if score.value >= 7.5:
            pros.append(f"{label} {score.value:g}/10 ({origin}), one of your priorities")
        elif score.value <= 5:
            cons.append(f"{label} only {score.value:g}/10 ({origin}), one of your priorities")
    derived = any(route.scores[d].derived for d in used)
    parts = ", ".join(f"{d.replace('_', ' ')} {route.scores[d].value:g} x{w:g}" for d, w in used.items())
    basis = f"{'estimated' if derived else 'report'} scores weighted by your priorities ({parts}) give {base:.1f}/10"
    return base, basis, pros, cons, derived


def _scenario(facts: dict) -> dict:
    """Place the dataset in the report's scenario table (complexity × normal count × abnormal count)."""
    thresholds = load_rules()["scenario"]
    complexity = "low" if facts["kind"] == "texture" or facts["aligned"] else "high"
    normals = "many" if facts["n_normal"] >= thresholds["many_normals"] else "few"
    abnormals = "many" if facts["n_abnormal"] >= thresholds["many_abnormals"] else "few"
    entry = load_knowledge().scenario(complexity=complexity, normals=normals, abnormals=abnormals)
    return {"complexity": complexity, "normals": normals, "abnormals": abnormals,
            "anomaly_detection": entry.anomaly_detection, "supervised": entry.supervised,
            "basis": thresholds["basis"], "source": entry.source}


def weights_backbone(weights: str) -> str:
    """The backbone a local weights file (``--weights``) belongs to; :class:`UsageError` when it cannot be told."""
    try:
        backbone = backbone_of_weights(weights)
    except BackboneWeightsError as exc:
        raise UsageError(str(exc)) from exc
    if backbone is None:
        raise UsageError(f"{weights}: unknown weights file; name its backbone in a constraint profile instead "
                         "(backbone_weights: {timm_model_name: path})")
    return backbone


def local_weights(constraints: ConstraintProfile, weights: str | None = None) -> dict[str, str]:
    """Local weights files by backbone: the constraint profile's ``backbone_weights`` and ``--weights`` (its backbone
    read from the file)."""
    local = dict(constraints.backbone_weights)
    if weights:
        local[weights_backbone(weights)] = str(Path(weights).resolve())
    return local


def available_backbones(constraints: ConstraintProfile, weights: str | None = None) -> tuple[list[str], str]:
    """Backbones of the cost model (light to heavy) whose weights can be had here: a local file (``weights`` or
    the constraint profile's ``backbone_weights``), the hub cache, the built-in weights, or, when the hub answers,
    a download. Also a note saying which."""
    names = [b["name"] for b in cost_model()["backbones"]]
    local = set(local_weights(constraints, weights))
    if hub_reachable():
        return names, "the hub is reachable: every backbone's weights can be downloaded"
    have = [b for b in names if b in local or weights_available(b)]
    missing = [b for b in names if b not in have]
    note = (f"offline: weights here for {', '.join(have)}" +
            (f"; not for {', '.join(missing)} (pass --weights FILE or list backbone_weights in a --profile)"
             if missing else ""))
    return have, note


def recommend(profile: DatasetProfile, constraints: ConstraintProfile, top: int = SHORTLIST_SIZE,
              weights: str | None = None, families: Collection[str] | None = None) -> Recommendation:
    """Rank all routes (deterministic for a given machine) and shortlist the ``top`` best that can run, with any
    route tied with the last of them (within ``SHORTLIST_TIE_POINTS``). Excluded routes are listed last with the
    reasons they were excluded. Backbones are proposed only when their weights are available (``weights``: a local
    weights file, as for the search); the input geometry comes from the profile (:mod:`automl_ad.recommend.geometry`).
    ``families``: the families that can run (e.g. those with a search space); a route is shortlisted only with
    one of them (None: every family the knowledge base names)."""
    if top < 1:
        raise ValueError("the shortlist needs at least one route (top >= 1)")
    knowledge = load_knowledge()
    searchable = set(families) if families is not None else {f for r in knowledge.routes.values() for f in r.families}
    rules = load_rules()["rules"]
    facts = gather_facts(profile, constraints)
    structure_certainty = 1.0 if "kind" in constraints.data else facts["structure_confidence"]
    backbones, backbone_note = available_backbones(constraints, weights)
    data = profile.with_overrides(constraints.data) if constraints.data else profile
    proposal = propose_geometry(data, constraints, backbones[0])
    chosen = proposal.chosen
    left_out = _families_left_out(load_rules()["family_rules"], facts)
    candidates = []
    for key, route in knowledge.routes.items():
        estimate = estimate_route(key, constraints, _working_side(route.families), chosen.network_pixels,
                                  max(chosen.geometry.input_hw), backbones)
        route_facts = _route_facts(route, estimate)
        base, basis, pros, cons, derived = _base_score(route, constraints.priorities)
        adjustments, structural = [], False
        for rule in rules:
            if not all(_holds(facts.get(k), c, facts) for k, c in rule["when"].items()):
                continue
            if not _matches(rule["routes"], route_facts, facts):
                continue
            effect = rule["effect"]
            if effect == "exclude":
                points, kind = 0.0, "exclude"
            elif "adjust" in effect:
                points, kind = float(effect["adjust"]), "adjust"
            else:
                points = effect["per_point"] * (route_facts["score"][effect["scale"]] - effect["centre"])
                kind = "adjust"
            if kind == "adjust" and abs(points) < 1e-9:
                continue
            structural |= bool(_STRUCTURE_FACTS & set(rule["when"])) or "requirement" in rule["routes"]
            adjustments.append(Adjustment(rule["id"], kind, round(points, 2), _fill(rule["reason"], facts, route_facts),
                                          rule["evidence"]))
        excluded = any(a.effect == "exclude" for a in adjustments)
        score = min(10.0, max(0.0, base + sum(a.points for a in adjustments)))
        confidence = (_DERIVED_RELIABILITY if derived else _REPORT_RELIABILITY)
        confidence *= structure_certainty if structural else 1.0
        confidence *= 0.85 if facts["n_normal"] < 20 else 1.0
        candidates.append(RouteCandidate(
            route=key, name=route.name, branch=route.branch, score=round(score, 2), base_score=round(base, 2),
            confidence=round(confidence, 2), basis=basis, excluded=excluded, shortlisted=False,
            reasons_for=pros + [a.reason for a in adjustments if a.points > 0],
            reasons_against=cons + [a.reason for a in adjustments if a.effect == "exclude" or a.points < 0]
            + [left_out[f] for f in route.families if f in searchable and f in left_out],
            adjustments=adjustments, families=[f for f in route.families if f in searchable and f not in left_out],
            backbone=estimate.backbone, resolution=estimate.resolution, estimated_latency_ms=estimate.latency_ms))
    order = list(knowledge.routes)
    candidates.sort(key=lambda c: (c.excluded, -c.score, order.index(c.route)))
    runnable = [c for c in candidates if not c.excluded and c.families]
    last = runnable[min(top, len(runnable)) - 1].score if runnable else 0.0
    shortlist = [c.route for i, c in enumerate(runnable) if i < top or c.score >= last - SHORTLIST_TIE_POINTS]
    for candidate in candidates:
        candidate.shortlisted = candidate.route in shortlist
    return Recommendation(profile.name, profile.fingerprint, constraints.name, facts, _scenario(facts),
                          candidates, shortlist, proposal.to_dict(), backbones, backbone_note)


def _working_side(families: list[str]) -> int:
    """The image side a route without a backbone works at: the largest default ``input_size`` of its families (what
    their default trials run at, whatever the images' size)."""
    return max(detector_class(family)().input_size for family in families)
