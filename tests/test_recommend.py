"""Recommender: the behaviours the report's rules imply, determinism, explanations with the user's facts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from automl_ad.constraints import ConstraintProfile, Hardware, load_constraints
from automl_ad.knowledge import ROUTE_KEYS
from automl_ad.profiling.profile import ColorStats, Counts, DatasetProfile, SizeStats
from automl_ad.profiling.structure import AlignmentStats, StructureStats
from automl_ad.recommend import load_rules, recommend
from automl_ad.search.space import searchable_families

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def make_profile(kind="object", n_normal=200, aligned=True, periodic=False, n_abnormal=0) -> DatasetProfile:
    """A profile with chosen facts (what profiling would report for such data)."""
    return DatasetProfile(
        name="synthetic", root="/data/synthetic", layout="mvtec", fingerprint="0" * 16,
        counts=Counts(n_normal, 10, 0, {"crack": n_abnormal} if n_abnormal else {}, 0, 0),
        size=SizeStats(256, 256, 256, 256, 256, 256, 1),
        color=ColorStats("color", 0, n_normal, 0, [8]),
        structure=StructureStats(kind, 0.95, 0.8 if aligned and kind == "object" else 0.03, 0.05, 0.4 if periodic else 0.05,
                                 periodic),
        alignment=AlignmentStats(0.9 if aligned else 0.1, 0.9 if aligned else 0.1, 0.9 if aligned else 0.1, 0.0,
                                 aligned, aligned),
        defects=None, sample_images=n_normal, sample_resolution=128, profiling_seconds=0.1)


CPU = ConstraintProfile(name="cpu", hardware=Hardware("cpu", 4, 16.0))


def _ranks(recommendation):
    return {c.route: i for i, c in enumerate(recommendation.candidates)}


def test_every_route_is_scored_and_explained():
    rec = recommend(make_profile(), CPU)
    assert sorted(c.route for c in rec.candidates) == sorted(ROUTE_KEYS)
    for c in rec.candidates:
        assert 0 <= c.score <= 10 and 0 < c.confidence <= 1
        assert set(c.families) <= set(searchable_families()) and "weighted by your priorities" in c.basis
        if c.excluded:
            assert not c.shortlisted and any(a.effect == "exclude" for a in c.adjustments)
    assert len(rec.shortlist) == 4 and all(rec.candidate(r).shortlisted for r in rec.shortlist)


def test_only_searchable_families_are_listed_and_shortlisted(monkeypatch):
    import automl_ad.search.space as space

    available = [f for f in searchable_families() if f != "patchcore"]
    monkeypatch.setattr(space, "searchable_families", lambda: available)
    rec = recommend(make_profile(n_normal=10), CPU)  # few normals: memory bank would rank high
    assert rec.candidate("memory_bank").families == [] and "memory_bank" not in rec.shortlist
    assert all(rec.candidate(r).families for r in rec.shortlist)


def test_deterministic_and_shortlist_size():
    profile = make_profile()
    assert recommend(profile, CPU).to_dict() == recommend(profile, CPU).to_dict()
    assert len(recommend(profile, CPU, top=2).shortlist) == 2
    with pytest.raises(ValueError):
        recommend(profile, CPU, top=0)


def test_few_normals_favour_memory_bank_and_one_class_and_exclude_gan_diffusion():
    few = recommend(make_profile(n_normal=20), CPU)
    many = recommend(make_profile(n_normal=500), CPU)
    for route in ("gan", "diffusion"):
        candidate = few.candidate(route)
        assert candidate.excluded
        assert any("you have 20" in r and "data quantity 3/10" in r for r in candidate.reasons_against)
    deep = [c.route for c in few.candidates if c.branch == "deep" and not c.excluded]
    assert deep[0] == "memory_bank"
    for route in ("memory_bank", "one_class"):
        bonus = sum(a.points for a in few.candidate(route).adjustments if a.rule == "few-normals-favour-frugal")
        assert bonus > 0
    assert _ranks(few)["one_class"] < _ranks(many)["one_class"]
    assert _ranks(few)["one_class"] < min(_ranks(few)[r] for r in ("autoencoder", "gan", "diffusion"))


def test_periodic_texture_makes_frequency_and_decomposition_eligible_not_template():
    rec = recommend(make_profile(kind="texture", aligned=False, periodic=True), CPU)
    for route in ("frequency_domain", "image_decomposition"):
        assert not rec.candidate(route).excluded
        assert any("periodic" in r for r in rec.candidate(route).reasons_for)
    assert rec.candidate("template_matching").excluded
    assert "frequency_domain" in rec.shortlist
    on_objects = recommend(make_profile(kind="object"), CPU)
    assert on_objects.candidate("frequency_domain").excluded and on_objects.candidate("image_decomposition").excluded


def test_tight_cpu_budget_puts_light_routes_ahead_of_diffusion_and_flows():
    rec = recommend(make_profile(kind="object", aligned=True), load_constraints(PROFILES / "edge-cpu.yaml"))
    ranks = _ranks(rec)
    for light in ("teacher_student", "memory_bank"):
        assert ranks[light] < ranks["diffusion"] and ranks[light] < ranks["distribution_map"]
        assert rec.candidate(light).shortlisted
    assert rec.candidate("memory_bank").backbone in ("mobilenetv2_100", "efficientnet_b0")
    assert rec.candidate("diffusion").excluded


def test_gpu_high_accuracy_many_normals_puts_distribution_memory_bank_diffusion_on_top():
    constraints = load_constraints(PROFILES / "offline-high-accuracy.yaml")
    for profile in (make_profile(kind="object", n_normal=400), make_profile(kind="texture", aligned=False, n_normal=400)):
        rec = recommend(profile, constraints)
        top3 = {c.route for c in rec.candidates[:3]}
        assert top3 == {"distribution_map", "memory_bank", "diffusion"}
        assert rec.candidate("memory_bank").backbone == "wide_resnet50_2"


def test_unaligned_data_excludes_template_matching_with_the_users_fact():
    rec = recommend(make_profile(kind="object", aligned=False), CPU)
    reasons = " ".join(rec.candidate("template_matching").reasons_against)
    assert rec.candidate("template_matching").excluded and "alignment 0.1" in reasons


def test_localization_requirement_penalises_image_level_routes():
    required = replace(CPU, localization="required")
    not_needed = replace(CPU, localization="not_needed")
    profile = make_profile()
    assert (recommend(profile, required).candidate("classification_surface").score
            < recommend(profile, not_needed).candidate("classification_surface").score)


def test_constraint_profile_can_override_detected_facts():
    detected_object = make_profile(kind="object", aligned=False)
    as_texture = replace(CPU, data={"kind": "texture", "periodic": True})
    rec = recommend(detected_object, as_texture)
    assert rec.facts["kind"] == "texture"
    assert not rec.candidate("frequency_domain").excluded


def test_rules_are_documented_data():
    for rule in load_rules()["rules"]:
        assert rule["id"] and rule["reason"] and rule["evidence"]
        assert rule["effect"] == "exclude" or {"adjust"} <= set(rule["effect"]) or {"scale", "per_point"} <= set(rule["effect"])


def test_recommendation_round_trips_to_json(tmp_path):
    import json

    rec = recommend(make_profile(), CPU)
    data = json.loads(rec.save(tmp_path / "r.json").read_text())
    assert data["shortlist"] == rec.shortlist and len(data["candidates"]) == 14
    assert data["scenario"]["anomaly_detection"] in ("yes", "no", "few_shot")
