"""Recommender: the behaviours the report's rules imply, determinism, explanations with the user's facts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SHARED_WEIGHTS, needs

from automl_ad.constraints import ConstraintProfile, Hardware, load_constraints
from automl_ad.knowledge import ROUTE_KEYS
from automl_ad.profiling.profile import ColorStats, Counts, DatasetProfile, SizeStats
from automl_ad.profiling.structure import AlignmentStats, StructureStats
from automl_ad.recommend import load_rules, recommend
from automl_ad.search.space import searchable_families

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Recommendations as on a machine that reaches the hub (every backbone can be downloaded), unless a test
    says otherwise: the result must not depend on this machine's network."""
    import automl_ad.recommend.engine as engine

    monkeypatch.setattr(engine, "hub_reachable", lambda: True)


def make_profile(kind="object", n_normal=200, aligned=True, periodic=False, n_abnormal=0, size=(256, 256),
                 defects=None) -> DatasetProfile:
    """A profile with chosen facts (what profiling would report for such data); ``size`` is (height, width)."""
    height, width = size
    return DatasetProfile(
        name="synthetic", root="/data/synthetic", layout="mvtec", fingerprint="0" * 16,
        counts=Counts(n_normal, 10, 0, {"crack": n_abnormal} if n_abnormal else {}, 0 if defects is None else 50, 0),
        size=SizeStats(width, width, width, height, height, height, 1, width / height, width / height, width / height),
        color=ColorStats("color", 0, n_normal, 0, [8]),
        structure=StructureStats(kind, 0.95, 0.8 if aligned and kind == "object" else 0.03, 0.05,
                                 0.4 if periodic else 0.05, periodic),
        alignment=AlignmentStats(0.9 if aligned else 0.1, 0.9 if aligned else 0.1, 0.9 if aligned else 0.1, 0.0,
                                 aligned, aligned),
        defects=defects, sample_images=n_normal, sample_resolution=128, sample_hw=(128, 128), profiling_seconds=0.1)


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
    assert len(rec.shortlist) >= 4 and all(rec.candidate(r).shortlisted for r in rec.shortlist)


def test_only_searchable_families_are_listed_and_shortlisted():
    available = [f for f in searchable_families() if f != "patchcore"]
    rec = recommend(make_profile(n_normal=10), CPU, families=available)  # few normals: memory bank would rank high
    assert rec.candidate("memory_bank").families == [] and "memory_bank" not in rec.shortlist
    assert all(rec.candidate(r).families for r in rec.shortlist)


def test_a_route_tied_with_the_last_shortlisted_one_joins_the_shortlist():
    from automl_ad.defaults import SHORTLIST_TIE_POINTS

    rec = recommend(make_profile(), CPU)
    runnable = [c for c in rec.candidates if not c.excluded and c.families]
    for top in range(1, len(runnable)):
        shortlist = recommend(make_profile(), CPU, top=top).shortlist
        last = runnable[top - 1].score
        assert shortlist == [c.route for c in runnable if c.score >= last - SHORTLIST_TIE_POINTS or
                             runnable.index(c) < top]
        assert len(shortlist) >= top


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
    for profile in (make_profile(kind="object", n_normal=400),
                    make_profile(kind="texture", aligned=False, n_normal=400)):
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


def test_per_position_families_are_left_out_for_parts_that_move():
    """PaDiM's per-position Gaussian needs the part at the same place: on unaligned objects its route keeps
    FastFlow and says why PaDiM is not there; aligned objects and textures keep it."""
    moved = recommend(make_profile(kind="object", aligned=False), CPU).candidate("distribution_map")
    assert "padim" not in moved.families and "fastflow" in moved.families
    assert any(r.startswith("padim left out") and "alignment 0.1" in r for r in moved.reasons_against)
    moved = make_profile(kind="object", aligned=False)
    unsure = replace(moved, structure=replace(moved.structure, confidence=0.6))  # perhaps a texture
    for profile in (make_profile(kind="object", aligned=True), make_profile(kind="texture", aligned=False), unsure):
        kept = recommend(profile, CPU).candidate("distribution_map")
        assert "padim" in kept.families and not any("padim left out" in r for r in kept.reasons_against)


def test_rules_are_documented_data():
    for rule in load_rules()["rules"] + load_rules()["family_rules"]:
        assert rule["id"] and rule["reason"] and rule["evidence"]
    assert all(set(rule["families"]) <= set(searchable_families()) for rule in load_rules()["family_rules"])
    for rule in load_rules()["rules"]:
        effect = rule["effect"]
        assert effect == "exclude" or {"adjust"} <= set(effect) or {"scale", "per_point"} <= set(effect)


def test_recommendation_round_trips_to_json(tmp_path):
    import json

    rec = recommend(make_profile(), CPU)
    data = json.loads(rec.save(tmp_path / "r.json").read_text())
    assert data["shortlist"] == rec.shortlist and len(data["candidates"]) == 14
    assert data["scenario"]["anomaly_detection"] in ("yes", "no", "few_shot")


# --- input geometry and available backbones ----------------------------------------------------------------------

def _defects(p10_px: float, median_px: float):
    from automl_ad.profiling.profile import DefectStats

    return DefectStats(masks=50, area_fraction_min=0.0005, area_fraction_median=0.003, area_fraction_max=0.02,
                       small_defect_share=0.9, regions_median=1.0, measured_masks=50, size_px_p10=p10_px,
                       size_px_median=median_px, size_fraction_p10=0.04, size_fraction_median=0.09,
                       base_cells_p10=0.5, base_cells_median=1.1)


def _geometry(rec):
    from automl_ad.data.geometry import Geometry

    return Geometry.from_dict(rec.geometry["geometry"])


def test_a_256_image_is_not_tiled():
    rec = recommend(make_profile(size=(256, 256)), CPU)
    assert rec.geometry["key"] == "squash-256x256" == rec.geometry["default"]["key"] and rec.geometry["tiles"] == 1
    assert any("the default is kept" in r for r in rec.geometry["reasons"])
    # large defects in a large image: the default view already shows them with room to spare
    rec = recommend(make_profile(size=(900, 900), defects=_defects(70, 150)), CPU)
    assert rec.geometry["key"] == "squash-256x256" and rec.geometry["cells"] >= 2


def test_an_image_smaller_than_the_default_gets_no_native_tile_that_shows_defects_smaller():
    rec = recommend(make_profile(size=(96, 96)), CPU)
    assert rec.geometry["key"] == "squash-256x256"
    assert all(a["cells"] > rec.geometry["default"]["cells"] or a["network_pixels"] < rec.geometry["network_pixels"]
               for a in rec.geometry["alternatives"])
    assert not any(a["key"].startswith("tile-") for a in rec.geometry["alternatives"])


def test_routes_without_a_backbone_are_costed_at_the_side_their_default_trials_run_at():
    """Template matching's default works at 256 px on 1800-px and on 96-px images alike: the table said 512 and 96,
    costed 4x over on the first."""
    from automl_ad.detectors import detector_class

    side = detector_class("template")().input_size
    for size in ((1800, 1800), (96, 96)):
        template = recommend(make_profile(size=size), CPU).candidate("template_matching")
        assert template.resolution == side and template.backbone is None


def test_small_defects_in_wide_images_keep_aspect_at_native_resolution_and_the_reason_says_why():
    rec = recommend(make_profile(size=(460, 1130), defects=_defects(18, 40)), CPU)
    g = rec.geometry
    assert g["default"]["cells"] < 1  # 18 px * 256/1130 / 8
    geometry = _geometry(rec)
    # one view at about native pixels costs less than overlapping tiles of the same image
    assert geometry.mode == "letterbox" and g["tiles"] == 1 and g["cells"] >= 2
    assert geometry.width / geometry.height == pytest.approx(1130 / 460, rel=0.1)
    why = " ".join(g["reasons"])
    assert "~18 px" in why and "1130x460" in why and f"{g['default']['cells']:.1f}" in why and "aspect" in why
    # a cheap first step for the search: the least compute that doubles the default's cells
    step = min(g["alternatives"], key=lambda a: a["network_pixels"])
    assert step["cells"] >= 2 * g["default"]["cells"] and step["network_pixels"] < g["network_pixels"]
    # every backbone route is costed at the proposed geometry's pixels
    assert rec.candidate("memory_bank").resolution == max(geometry.height, geometry.width)
    # twice the size: no view within the latency budget reaches 2 cells; the reasons name the tiling that would
    rec = recommend(make_profile(size=(920, 2260), defects=_defects(18, 40)), CPU)
    why = " ".join(rec.geometry["reasons"])
    assert rec.geometry["cells"] < 2 and "no geometry reaches 2 cells" in why and "tiles of" in why


def test_a_small_wide_image_gets_one_view_at_native_pixels_rather_than_tiles():
    """300x200 images with defects no geometry shows at 2 cells: a 288x192 letterbox (native pixels, rounded to
    the deepest stride) shows them as large as tiles at native scale in half the pixels. The 64-px steps had
    only 256x192 (15% smaller) and 320x224 (enlarging), so two tiles of 224x256 were proposed."""
    rec = recommend(make_profile(size=(200, 300)), CPU)
    geometry = _geometry(rec)
    assert (geometry.mode, geometry.height, geometry.width) == ("letterbox", 192, 288) and rec.geometry["tiles"] == 1
    tiles = [a for a in rec.geometry["alternatives"] if a["key"].startswith("tile-")]
    assert tiles and all(t["cells"] <= rec.geometry["cells"] * 1.05 for t in tiles)
    assert all(t["network_pixels"] > rec.geometry["network_pixels"] for t in tiles)
    # 319x258 (a 320-px view enlarges by 0.3%): the native view, not one 384x384 tile, a third of it reflection
    native = _geometry(recommend(make_profile(size=(319, 258), defects=_defects(7, 25)), CPU))
    assert native.mode != "tile" and max(native.height, native.width) == 320


def test_extreme_aspect_tiles_along_the_long_side():
    from automl_ad.data.geometry import tile_grid

    rec = recommend(make_profile(kind="texture", aligned=False, size=(256, 4096)), CPU)
    geometry = _geometry(rec)
    assert geometry.mode == "tile" and geometry.scale == 1.0
    grid = tile_grid(geometry, (256, 4096))
    assert {y for y, _ in grid.origins} == {0} and grid.n_tiles >= 4096 // geometry.width
    assert "assumed 5% of the 256-px short side" in rec.geometry["reasons"][0]


def test_tiles_of_a_strip_are_cut_to_its_height_instead_of_padded():
    """A 2048x128 strip with 3-px defects: the tiles run along it at the strip's height (128, a multiple of the
    deepest stride), so no network pixel is reflection; 256x256 tiles would be half padding for the same cells."""
    from automl_ad.data.geometry import tile_grid

    rec = recommend(make_profile(kind="texture", aligned=False, size=(128, 2048), defects=_defects(3, 5)), CPU)
    geometry = _geometry(rec)
    assert geometry.mode == "tile" and geometry.height == 128 and geometry.width > geometry.height
    grid = tile_grid(geometry, (128, 2048))
    assert grid.padding[:2] == (0, 0) and {y for y, _ in grid.origins} == {0}
    assert rec.geometry["network_pixels"] <= 1.2 * 128 * 2048  # the overlaps only
    odd = _geometry(recommend(make_profile(kind="texture", aligned=False, size=(100, 3000)), CPU))
    assert odd.mode == "tile" and odd.height == 128  # 100 px rounded up to the deepest stride


def test_moderate_need_grows_a_single_view_before_tiling():
    rec = recommend(make_profile(size=(1024, 1024)), CPU)  # no masks: 5% of 1024 = 51 px needs scale 0.31
    assert rec.geometry["geometry"]["mode"] == "squash" and rec.geometry["tiles"] == 1
    assert 256 < rec.geometry["geometry"]["height"] <= 512 and rec.geometry["cells"] >= 2
    wide = recommend(make_profile(size=(500, 1250), defects=_defects(60, 100)), CPU)
    assert wide.geometry["geometry"]["mode"] == "letterbox"  # aspect 2.5 is kept, not squashed


def test_images_of_varied_aspect_are_letterboxed_not_squashed():
    profile = make_profile(size=(324, 270), defects=_defects(8, 21))
    square = recommend(profile, CPU).geometry
    varied = recommend(replace(profile, size=replace(profile.size, aspect_p10=0.46, aspect_p90=1.7)), CPU).geometry
    assert square["geometry"]["mode"] == "squash" and varied["geometry"]["mode"] == "letterbox"
    assert any("0.46-1.70 (width/height) kept instead of squashed" in r for r in varied["reasons"])


def test_latency_budget_caps_the_geometry():
    tight = ConstraintProfile(name="tight", latency_ms=20, hardware=Hardware("cpu", 4, 16.0))
    profile = make_profile(size=(460, 1130), defects=_defects(18, 40))
    loose = recommend(profile, CPU).geometry
    capped = recommend(profile, tight).geometry
    assert capped["backbone_ms"] <= 20 < loose["backbone_ms"] and capped["cells"] < loose["cells"]
    assert any("over your 20 ms budget" in r for r in capped["reasons"])


def test_an_assumed_budget_ranks_geometries_but_only_a_stated_one_excludes_them():
    """Without a stated budget, a finer geometry over the assumed one is still searched: on 2260x460 strips with
    6-px defects, tiles at native pixels give 2.7x the cells of the letterbox the assumed 200 ms allows."""
    two_cores = ConstraintProfile(name="cpu", hardware=Hardware("cpu", 2, 16.0))
    profile = make_profile(size=(460, 2260), defects=_defects(6, 13))
    assumed = recommend(profile, two_cores).geometry
    stated = recommend(profile, replace(two_cores, latency_ms=assumed["target_ms"])).geometry
    over = [a for a in assumed["alternatives"] if a["backbone_ms"] > assumed["target_ms"]]
    assert assumed["backbone_ms"] <= assumed["target_ms"] and assumed["key"] == stated["key"]
    assert len(over) == 1 and over[0]["cells"] > assumed["cells"]
    assert any("the search tries it anyway" in r for r in assumed["reasons"])
    assert all(a["backbone_ms"] <= stated["target_ms"] for a in stated["alternatives"])


def test_more_pixels_cost_proportionally_more_backbone_time():
    from automl_ad.recommend.cost import pixels_ms

    assert pixels_ms(0.3, 2 * 256 * 256, CPU) == pytest.approx(2 * pixels_ms(0.3, 256 * 256, CPU))


def test_a_declared_defect_size_drives_the_geometry():
    profile = make_profile(size=(1024, 1024))
    tiny = recommend(profile, replace(CPU, data={"smallest_defect_px": 10})).geometry
    large = recommend(profile, replace(CPU, data={"smallest_defect_px": 200})).geometry
    assert "declared" in tiny["defect_source"] and tiny["smallest_defect_px"] == 10
    # native pixels for the tiny one (one 1024 view: cheaper than overlapping tiles), the default for the large one
    assert tiny["network_pixels"] >= 1024 * 1024 and tiny["cells"] > 1 and large["key"] == "squash-256x256"


@pytest.fixture
def offline(monkeypatch):
    """No hub and an empty hub cache: only the built-in backbone and local files have weights."""
    import automl_ad.features.backbone as backbone
    import automl_ad.recommend.engine as engine

    monkeypatch.setenv("AUTOML_AD_OFFLINE", "1")
    backbone.hub_reachable.cache_clear()
    monkeypatch.setattr(engine, "hub_reachable", backbone.hub_reachable)
    monkeypatch.setattr(backbone, "hub_weights_cached", lambda name: False)
    yield
    backbone.hub_reachable.cache_clear()


def test_offline_only_backbones_with_weights_are_proposed(offline):
    constraints = load_constraints(PROFILES / "offline-high-accuracy.yaml")  # online: wide_resnet50_2
    rec = recommend(make_profile(kind="object", n_normal=400), constraints)
    assert rec.backbones == ["mobilenetv2_100"] and "not for" in rec.backbone_note
    assert {c.backbone for c in rec.candidates if c.backbone} == {"mobilenetv2_100"}
    assert rec.geometry["costed_with"] == "mobilenetv2_100"
    declared = replace(constraints, backbone_weights={"resnet18": "/models/resnet18.safetensors"})
    rec = recommend(make_profile(kind="object", n_normal=400), declared)
    assert rec.backbones == ["mobilenetv2_100", "resnet18"] and rec.candidate("memory_bank").backbone == "resnet18"


@needs(SHARED_WEIGHTS)
def test_weights_file_names_its_backbone_and_unknown_files_are_refused(offline, tmp_path):
    from automl_ad.errors import UsageError

    rec = recommend(make_profile(), CPU, weights=str(SHARED_WEIGHTS))
    assert rec.backbones == ["mobilenetv2_100"]
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(UsageError, match="is not a safetensors file"):  # the check fit makes too
        recommend(make_profile(), CPU, weights=str(junk))
    import numpy as np
    from safetensors.numpy import save_file

    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(unknown))
    with pytest.raises(UsageError, match="unknown weights file"):
        recommend(make_profile(), CPU, weights=str(unknown))
    with pytest.raises(UsageError, match="does not exist"):
        recommend(make_profile(), CPU, weights=str(tmp_path / "missing.safetensors"))


def test_geometry_is_saved_with_the_recommendation(tmp_path):
    import json

    from automl_ad.data.geometry import Geometry

    rec = recommend(make_profile(size=(460, 1130), defects=_defects(18, 40)), CPU)
    data = json.loads(rec.save(tmp_path / "r.json").read_text())
    geometry = Geometry.from_dict(data["geometry"]["geometry"])
    assert geometry.key() == data["geometry"]["key"] and data["backbones"] == rec.backbones
    assert all(Geometry.from_dict(a["geometry"]).key() == a["key"] for a in data["geometry"]["alternatives"])


def test_printed_recommendation_survives_markup_in_names():
    import io

    from rich.console import Console

    from automl_ad.cli import _print_recommendation

    rec = recommend(replace(make_profile(size=(460, 1130), defects=_defects(18, 40)), name="[/red]evil[bold]"),
                    replace(CPU, name="[/]x"))
    out = io.StringIO()
    _print_recommendation(Console(file=out, width=200), rec)
    text = out.getvalue()
    assert "[/red]evil[bold]" in text and "'[/]x'" in text and "input geometry: letterbox-" in text


@needs(SHARED_WEIGHTS)
def test_cli_recommend_takes_weights_and_reports_the_geometry(offline, mvtec_dir, tmp_path, monkeypatch, capsys):
    import json

    from automl_ad.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["recommend", str(mvtec_dir), "--weights", str(SHARED_WEIGHTS), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["categories"][0]["recommendation"]
    assert rec["backbones"] == ["mobilenetv2_100"] and rec["geometry"]["key"] == "squash-256x256"
    assert main(["recommend", str(mvtec_dir), "--weights", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_constraint_profiles_declare_the_smallest_defect():
    from automl_ad.constraints.profile import constraints_from_dict
    from automl_ad.errors import ConfigError

    constraints = constraints_from_dict({"data": {"smallest_defect_px": 12}})
    rec = recommend(make_profile(size=(1024, 1024)), constraints)
    assert rec.facts["smallest_defect_px"] == 12 and rec.geometry["smallest_defect_px"] == 12
    for bad in (0, 2.5, "12"):
        with pytest.raises(ConfigError, match="smallest_defect_px"):
            constraints_from_dict({"data": {"smallest_defect_px": bad}})
