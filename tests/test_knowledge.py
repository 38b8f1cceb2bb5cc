"""The report's facts as data: completeness, agreement with the report, strict validation."""

from __future__ import annotations

import dataclasses
import math
import shutil
from importlib.resources import as_file, files

import pytest
import yaml

from automl_ad.knowledge import (
    COMPUTE_CLASSES,
    ROUTE_KEYS,
    SCORE_DIMENSIONS,
    SPEED_CLASSES,
    KnowledgeError,
    Requirements,
    load_knowledge,
)

TRADITIONAL = (
    "template_matching",
    "statistical",
    "image_decomposition",
    "frequency_domain",
    "sparse_coding",
    "classification_surface",
)
FEATURE_EMBEDDING = ("teacher_student", "one_class", "distribution_map", "memory_bank", "self_supervised")
RECONSTRUCTION = ("autoencoder", "gan", "diffusion")

# Report-digest §4.2 industrial scores: accuracy, resources, transferability, self_update,
# data_quality, data_quantity, interpretability.
DEEP_SCORES = {
    "teacher_student": (7, 9, 4, 5, 8, 6, 6),
    "one_class": (5, 3, 3, 3, 7, 8, 6),
    "distribution_map": (9, 5, 3, 5, 7, 5, 7),
    "memory_bank": (9, 7, 3, 8, 7, 7, 7),
    "self_supervised": (6, 9, 3, 5, 8, 5, 7),
    "autoencoder": (5, 7.5, 3, 4, 8, 4, 4),
    "gan": (6, 7, 3, 4, 7, 3, 4),
    "diffusion": (9, 5, 3, 4, 5, 3, 7),
}

FAMILIES = {
    "memory_bank": ("patchcore",),
    "distribution_map": ("padim", "fastflow"),
    "teacher_student": ("stpm",),
    "statistical": ("gaussian",),
    "frequency_domain": ("frequency",),
    "template_matching": ("template",),
    "one_class": ("deep_svdd",),
    "self_supervised": ("cutpaste", "simplenet"),
    "autoencoder": ("autoencoder",),
    "gan": ("ganomaly",),
    "diffusion": ("diffusion",),
    "image_decomposition": ("rpca",),
    "sparse_coding": ("sparse_coding",),
    "classification_surface": ("ocsvm",),
}

# Best work per deep route in the report's route summary table, with its image AUROC.
ROUTE_BEST = {
    "teacher_student": ("RSTPM", 98.7),
    "one_class": ("Patch SVDD", 92.1),
    "distribution_map": ("MSFlow", 99.7),
    "memory_bank": ("ReConPatch", 99.62),
    "self_supervised": ("MemSeg", 99.56),
    "autoencoder": ("DSR", 98.2),
    "gan": ("OCR-GAN", 98.3),
    "diffusion": ("DDAD", 99.8),
}

REQUIRED_METHODS = (
    "STPM", "EfficientAD", "RSTPM", "Deep SVDD", "Patch SVDD", "FastFlow", "MSFlow", "PatchCore",
    "ReConPatch", "CPR", "CutPaste", "SimpleNet", "MemSeg", "DSR", "AnoGAN", "OCR-GAN", "DDAD",
    "DiffusionAD", "Golden-template registration", "Gaussian statistical model",
    "RPCA (low-rank + sparse decomposition)", "POFT (phase-only Fourier transform)",
    "Background spectrum removal", "Dictionary learning / sparse coding", "OC-SVM", "SVDD",
)


@pytest.fixture(scope="module")
def kb():
    return load_knowledge()


def test_fourteen_routes_in_report_order(kb):
    assert ROUTE_KEYS == TRADITIONAL + FEATURE_EMBEDDING + RECONSTRUCTION
    assert tuple(kb.routes) == ROUTE_KEYS
    for key, route in kb.routes.items():
        assert route.key == key
        assert route.name and route.idea and route.suited_when
        assert route.strengths and route.weaknesses
    assert {k for k, r in kb.routes.items() if r.branch == "traditional"} == set(TRADITIONAL)
    assert all(kb.routes[k].sub_branch is None for k in TRADITIONAL)
    assert all(kb.routes[k].sub_branch == "feature_embedding" for k in FEATURE_EMBEDDING)
    assert all(kb.routes[k].sub_branch == "reconstruction" for k in RECONSTRUCTION)


def test_deep_scores_equal_the_report(kb):
    assert tuple(kb.score_dimensions) == SCORE_DIMENSIONS
    for key, expected in DEEP_SCORES.items():
        scores = kb.routes[key].scores
        assert tuple(scores) == SCORE_DIMENSIONS
        assert tuple(scores[d].value for d in SCORE_DIMENSIONS) == expected, key
        for score in scores.values():
            assert not score.derived
            assert "工业应用" in score.source and "line" in score.source


def test_traditional_scores_are_derived_with_a_basis(kb):
    for key in TRADITIONAL:
        for dim, score in kb.routes[key].scores.items():
            assert score.derived, (key, dim)
            assert score.basis.strip() and score.source.strip(), (key, dim)
            assert 0 <= score.value <= 10


def test_documented_examples(kb):
    assert kb.routes["memory_bank"].scores["accuracy"].value == 9
    assert isinstance(kb.routes["memory_bank"].scores["accuracy"].source, str)
    assert kb.routes["frequency_domain"].requirements.needs_periodic_texture is True
    assert kb.routes["frequency_domain"].scores["resources"].value == 10
    assert kb.routes["image_decomposition"].requirements.speed_class in ("slow", "very_slow")
    assert kb.routes["classification_surface"].requirements.image_level_only is True
    assert kb.routes["classification_surface"].localization is False
    assert kb.routes["memory_bank"].needs_training is False


def test_families_are_the_planned_detectors(kb):
    assert {k: r.families for k, r in kb.routes.items()} == FAMILIES


def test_requirements_are_complete_typed_and_explained(kb):
    names = [f.name for f in dataclasses.fields(Requirements)]
    for key, route in kb.routes.items():
        req = route.requirements
        assert set(route.requirement_basis) == {*names, "localization", "needs_training"}, key
        assert req.speed_class in SPEED_CLASSES
        assert req.compute in COMPUTE_CLASSES
        assert isinstance(req.min_normal_images, int) and req.min_normal_images >= 0
        # The report gives no sample counts, except that two routes need no training samples at all.
        assert route.requirement_basis["min_normal_images"].derived == (req.min_normal_images > 0)
        for evidence in route.requirement_basis.values():
            assert evidence.basis.strip() and evidence.source.strip()
    periodic = {k for k, r in kb.routes.items() if r.requirements.needs_periodic_texture}
    assert periodic == {"image_decomposition", "frequency_domain"}
    training_free = {k for k, r in kb.routes.items() if r.requirements.min_normal_images == 0}
    assert training_free == {"image_decomposition", "frequency_domain"}


def test_every_fact_has_a_source(kb):
    sources = [d.source for d in kb.score_dimensions.values()]
    for route in kb.routes.values():
        sources.append(route.source)
        sources += [s.source for s in route.scores.values()]
        sources += [e.source for e in route.requirement_basis.values()]
    sources += [m.source for m in kb.methods]
    sources += [s.source for s in kb.scenarios]
    sources += [g.source for g in kb.sample_guidance.values()]
    sources += [p.source for p in kb.preconditions]
    assert all(isinstance(s, str) and s.strip() for s in sources)
    cited = {part.split(" §")[0] for s in sources for part in s.split("; ")}
    assert cited <= set(kb.documents)


def test_leaderboard(kb):
    df = kb.leaderboard()
    assert len(df) == 82
    assert list(df["rank"]) == list(range(1, 83))
    top = df.iloc[0]
    assert top["model"] == "DDAD" and top["det_auroc"] == 99.8
    simplenet = df[df["model"] == "SimpleNet"].iloc[0]
    assert simplenet["fps"] == 77 and "3080" in simplenet["fps_note"]
    assert "mvtec_leaderboard_2023.csv" in kb.documents["mvtec-leaderboard-2023"].path
    df.loc[0, "model"] = "changed"
    assert kb.leaderboard().iloc[0]["model"] == "DDAD"


def test_methods_reference_routes_and_cover_the_report(kb):
    names = {m.name for m in kb.methods}
    assert set(REQUIRED_METHODS) <= names
    for method in kb.methods:
        assert method.route in kb.routes, method.name
        assert method.mechanism.strip()
    assert [m.name for m in kb.methods_for("memory_bank")] == ["PatchCore", "ReConPatch", "CPR"]
    assert all(kb.methods_for(key) for key in ROUTE_KEYS)
    with pytest.raises(KeyError):
        kb.methods_for("no_such_route")


def test_method_figures_agree_with_the_leaderboard(kb):
    board = kb.leaderboard().set_index("model")
    columns = {"image_auroc": "det_auroc", "pixel_auroc": "seg_auroc", "aupro": "seg_aupro", "pixel_ap": "seg_ap"}
    checked = 0
    for method in kb.methods:
        if method.leaderboard_model is None:
            continue
        row = board.loc[method.leaderboard_model]
        for field, column in columns.items():
            ours, theirs = getattr(method, field), row[column]
            if ours is not None and not math.isnan(theirs):
                assert ours == theirs, (method.name, field)
                checked += 1
        if method.fps is not None and not math.isnan(row["fps"]):
            assert method.fps == row["fps"], method.name
    assert checked >= 30


def test_route_best_matches_the_summary_table(kb):
    best = {m.route: (m.name, m.image_auroc) for m in kb.methods if m.route_best}
    assert best == ROUTE_BEST


def test_scenarios(kb):
    assert len(kb.scenarios) == 8
    row = kb.scenario(complexity="low", normals="few", abnormals="few")
    assert (row.anomaly_detection, row.supervised) == ("few_shot", "no")
    row = kb.scenario(complexity="high", normals="many", abnormals="few")
    assert (row.anomaly_detection, row.supervised) == ("yes", "no")
    row = kb.scenario(complexity="low", normals="many", abnormals="few")
    assert (row.anomaly_detection, row.supervised) == ("yes", "few_shot")
    assert kb.scenario(complexity="high", normals="few", abnormals="few").anomaly_detection == "no"
    with pytest.raises(ValueError, match="normals"):
        kb.scenario(complexity="low", normals="some", abnormals="few")
    assert kb.sample_guidance["few"].routes == ("memory_bank", "one_class", "distribution_map")
    assert kb.sample_guidance["many"].routes == ROUTE_KEYS
    assert [p.key for p in kb.preconditions] == [
        "consistent_normal_data", "rare_anomalies", "salient_anomalies", "stable_acquisition", "compute_limits",
    ]


def test_loader_is_cached_and_records_are_immutable(kb):
    assert load_knowledge() is kb
    with pytest.raises(dataclasses.FrozenInstanceError):
        kb.routes["gan"].name = "x"
    with pytest.raises(TypeError):
        kb.routes["gan"] = None
    with pytest.raises(TypeError):
        kb.routes["gan"].scores["accuracy"] = None


# --- malformed data -------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path):
    """A writable copy of the packaged knowledge files."""
    with as_file(files("automl_ad.knowledge")) as package_dir:
        for pattern in ("*.yaml", "*.csv"):
            for path in package_dir.glob(pattern):
                shutil.copy(path, tmp_path / path.name)
    return tmp_path


def _edit_yaml(path, change):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def test_copied_data_loads(data_dir):
    assert tuple(load_knowledge(data_dir).routes) == ROUTE_KEYS
    assert len(load_knowledge(str(data_dir)).leaderboard()) == 82


def _set_score(data):
    data["routes"]["memory_bank"]["scores"]["accuracy"]["value"] = 11


def _drop_route(data):
    del data["routes"]["gan"]


def _extra_route_key(data):
    data["routes"]["diffusion"]["colour"] = "blue"


def _unknown_source(data):
    data["routes"]["statistical"]["scores"]["resources"]["source"] = "nowhere"


def _bad_speed(data):
    data["routes"]["frequency_domain"]["requirements"]["speed_class"]["value"] = "instant"


def _string_bool(data):
    data["routes"]["one_class"]["localization"]["value"] = "yes"


def _missing_score(data):
    del data["routes"]["teacher_student"]["scores"]["interpretability"]


def _swap_route_order(data):
    routes = data["routes"]
    data["routes"] = {"statistical": routes.pop("statistical"), **routes}


def _method_route(data):
    data["methods"][0]["route"] = "quantum"


def _method_metric(data):
    data["methods"][-1]["image_auroc"] = 199.7


def _method_leaderboard_name(data):
    data["methods"][-1]["leaderboard_model"] = "DiffusionAD v9"


def _scenario_missing(data):
    data["scenarios"].pop()


def _guidance_route(data):
    data["sample_guidance"]["few"]["routes"].append("telepathy")


def _unknown_document(data):
    data["refs"]["tm"]["doc"] = "rumour"


@pytest.mark.parametrize(
    ("filename", "change", "message"),
    [
        ("routes.yaml", _set_score, r"routes\.yaml: routes\.memory_bank\.scores\.accuracy\.value: expected a number"),
        ("routes.yaml", _drop_route, r"routes\.yaml: routes: missing key\(s\) \['gan'\]"),
        ("routes.yaml", _extra_route_key, r"routes\.yaml: routes\.diffusion: unknown key\(s\) \['colour'\]"),
        ("routes.yaml", _unknown_source,
         r"routes\.statistical\.scores\.resources\.source: unknown source ref 'nowhere'"),
        ("routes.yaml", _bad_speed, r"routes\.frequency_domain\.requirements\.speed_class\.value: expected one of"),
        ("routes.yaml", _string_bool, r"routes\.one_class\.localization\.value: expected true/false"),
        ("routes.yaml", _missing_score, r"routes\.teacher_student\.scores: missing key\(s\) \['interpretability'\]"),
        ("routes.yaml", _swap_route_order, r"routes\.yaml: routes: keys must be in the order"),
        ("methods.yaml", _method_route, r"methods\.yaml: methods\[0\] \(.+\)\.route: unknown route 'quantum'"),
        ("methods.yaml", _method_metric, r"methods\.yaml: methods\[\d+\] \(DiffusionAD\)\.image_auroc"),
        ("methods.yaml", _method_leaderboard_name, r"methods\.yaml: DiffusionAD: leaderboard_model 'DiffusionAD v9'"),
        ("scenarios.yaml", _scenario_missing, r"scenarios\.yaml: scenarios: must list each"),
        ("scenarios.yaml", _guidance_route, r"scenarios\.yaml: sample_guidance\.few\.routes: expected one of"),
        ("sources.yaml", _unknown_document, r"sources\.yaml: refs\.tm\.doc: expected one of"),
    ],
)
def test_malformed_data_is_rejected(data_dir, filename, change, message):
    _edit_yaml(data_dir / filename, change)
    with pytest.raises(ValueError, match=message):
        load_knowledge(data_dir)


def test_yaml_syntax_errors_duplicates_and_missing_files(data_dir):
    routes = data_dir / "routes.yaml"
    original = routes.read_text(encoding="utf-8")

    routes.write_text(original + "\n  gan: [unclosed\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"routes\.yaml: invalid YAML"):
        load_knowledge(data_dir)

    routes.write_text(original.replace("  gan:\n", "  autoencoder:\n", 1), encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"routes\.yaml: invalid YAML: .*duplicate key 'autoencoder'"):
        load_knowledge(str(data_dir))

    routes.unlink()
    with pytest.raises(KnowledgeError, match=r"routes\.yaml: file not found"):
        load_knowledge(data_dir)


def test_unquoted_yes_in_scenarios_is_rejected(data_dir):
    scenarios = data_dir / "scenarios.yaml"
    text = scenarios.read_text(encoding="utf-8").replace('anomaly_detection: "yes"', "anomaly_detection: yes", 1)
    scenarios.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"scenarios\[0\]\.anomaly_detection: expected one of .* got True"):
        load_knowledge(data_dir)


def test_malformed_leaderboard_is_rejected(data_dir):
    board = data_dir / "mvtec_leaderboard_2023.csv"
    board.write_text(board.read_text(encoding="utf-8").replace("77(FP32 on 3080ti)", "fast"), encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"mvtec_leaderboard_2023\.csv: line 12: fps 'fast'"):
        load_knowledge(data_dir)
