"""Turn what the user typed (and what `recommend` left in the working directory) into a SearchRequest."""

from __future__ import annotations

import json
from pathlib import Path

from automl_ad.constraints import load_constraints
from automl_ad.data import open_dataset
from automl_ad.detectors import detector_class
from automl_ad.detectors.feature_based import BackboneDetector
from automl_ad.errors import UsageError
from automl_ad.features.backbone import hub_reachable, uses_builtin_weights, weights_available
from automl_ad.profiling import profile_dataset
from automl_ad.recommend import recommend
from automl_ad.recommend.engine import local_weights
from automl_ad.recommend.state import SCREEN_FILE, entry_for, load_state, read_recommendation
from automl_ad.search.request import SearchRequest
from automl_ad.search.space import allowed_backbones, load_space, proposed_geometries, searchable_families


def plan_search(data: str | None, category: str | None = None, profile: str | None = None,
                families: list[str] | None = None, weights: str | None = None, say=print, **options) -> SearchRequest:
    """Dataset, shortlist (families with priors), constraints and backbones for a search."""
    state = load_state()
    entry = entry_for(state, data, category)
    if data is None:
        if entry is None:
            raise UsageError("no dataset given and no earlier recommendation here: run `automl-ad recommend DATA` "
                             "first (it leaves its shortlist in .automl-ad/), or pass DATA")
        data, category = entry["dataset"], None
        say(f"Using the dataset and shortlist of the last `automl-ad recommend`: {data}")
    screen_file = _screen_file(entry)
    constraints = load_constraints(profile or (state or {}).get("constraints") if entry else profile)
    if entry is None:
        dataset = open_dataset(data, category)
        facts = profile_dataset(dataset)
        recommendation = recommend(facts.with_overrides(constraints.data) if constraints.data else facts,
                                   constraints, weights=weights, families=searchable_families()).to_dict()
        data, category = str(dataset.root), None
    else:
        recommendation = read_recommendation(entry)
        _remind_screen(screen_file, say)
    candidates = {c["route"]: c for c in recommendation["candidates"]}
    routes = {f: c["route"] for c in recommendation["candidates"] for f in c["families"]}
    searchable = set(searchable_families())
    explicit = bool(families)
    if families:
        unknown = [f for f in families if f not in searchable]
        if unknown:
            raise UsageError(f"unknown or unsearchable families {unknown}; searchable: {', '.join(sorted(searchable))}")
    else:
        shortlist = recommendation["shortlist"]
        families = [f for r in shortlist for f in candidates[r]["families"] if f in searchable]
        say(f"Shortlist from the recommendation: {', '.join(shortlist)} → families {', '.join(families)}")
        # routes further down the ranking stand in for shortlisted ones that cannot run here
        reserve = [f for c in recommendation["candidates"] if not c["excluded"] and c["route"] not in shortlist
                   for f in c["families"] if f in searchable]
    priors = {f: max(0.05, candidates[routes[f]]["score"] / 10) if f in routes else 0.5 for f in families}
    backbone_weights = local_weights(constraints, weights)
    backbones, kept = _backbones(families, routes, constraints, backbone_weights, say)
    if not explicit and len({routes.get(f) for f in kept}) < len({routes.get(f) for f in families}):
        wanted = len({routes.get(f) for f in families})
        for family in reserve:
            if len({routes.get(f) for f in kept}) >= wanted:
                break
            extra, runnable = _backbones([family], routes, constraints, backbone_weights, say)
            if runnable:
                backbones.update(extra)
                kept += runnable
                say(f"{family} ({routes.get(family)}, ranked lower) takes a place left free")
    families = kept
    if not families:
        raise UsageError("no family left to search (see the notes above)")
    return SearchRequest(data=str(data), category=category, families=families, priors=priors, routes=routes,
                         backbones=backbones, backbone_weights=backbone_weights,
                         geometries=proposed_geometries(recommendation),
                         preferred_backbone=next((c["backbone"] for c in recommendation["candidates"]
                                                  if c.get("backbone")), None),
                         profile_file=entry["profile"] if entry else None,
                         recommendation_file=entry["recommendation"] if entry else None,
                         screen_file=screen_file,
                         limits=constraints.deployment_limits(), **options)


def _backbones(families, routes, constraints, backbone_weights, say):
    """Per family: backbones that fit the latency budget and have weights here. Families left without any are
    dropped with a note saying how to provide weights."""
    online = None
    allowed, kept, on_builtin = {}, [], {}
    for family in families:
        if not issubclass(detector_class(family), BackboneDetector):
            kept.append(family)
            continue
        choices = next(p.choices for p in load_space(family).parameters if p.type == "backbone")
        fits = allowed_backbones(routes.get(family, ""), constraints)
        options = [b for b in choices if fits is None or b in fits]
        have = [b for b in options if b in backbone_weights or weights_available(b)]
        online = hub_reachable() if online is None else online
        if online:
            have = options
        if not have:
            say(f"note: {family} left out: no pretrained weights for {', '.join(options)} on this machine and the "
                "hub is unreachable. Pass --weights FILE (a timm state_dict) or list backbone_weights in a "
                "--profile.")
            continue
        builtin = [b for b in have if b not in backbone_weights and uses_builtin_weights(b)]
        if builtin:
            on_builtin.setdefault((builtin[0], have == builtin), []).append(family)
        allowed[family] = have
        kept.append(family)
    for (backbone, only), users in on_builtin.items():  # one note for all the families it concerns
        say(f"note: the hub is unreachable; {backbone} runs on the ImageNet weights built into automl-ad for "
            f"{', '.join(users)}{' (the only backbone with weights here)' if only else ''}. Other backbones: "
            "--weights FILE or backbone_weights in a --profile.")
    return allowed, kept


def _screen_file(entry: dict | None) -> str | None:
    """The screen recommend saved beside its recommendation (None: it did not screen)."""
    path = Path(entry["recommendation"]).with_name(SCREEN_FILE) if entry else None
    return str(path) if path is not None and path.is_file() else None


def _remind_screen(path: str | None, say) -> None:
    """Say again how many good images recommend's screen named (they are still trained on as normal)."""
    if path is None:
        return
    try:
        suspects = json.loads(Path(path).read_text()).get("suspects") or []
        highest = suspects[0]["image"] if suspects else None
    except (OSError, ValueError, AttributeError, LookupError, TypeError):  # none, or not as recommend wrote it
        return
    if highest:
        say(f"recommend's screen named {len(suspects)} good training image(s) that look unlike the others "
            f"(highest: {highest}); the search trains on them as normal. Check them ({path}) if you have not")
