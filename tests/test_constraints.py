"""Constraint profiles: shipped examples parse, bad files give clear errors with suggestions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automl_ad.constraints import ConstraintProfile, load_constraints, parse_duration
from automl_ad.errors import ConfigError

PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml"))


def test_ships_several_profiles():
    names = {p.stem for p in PROFILES}
    assert {"edge-cpu", "line-pc-gpu", "offline-high-accuracy", "few-shot-startup"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_shipped_profiles_parse(path):
    profile = load_constraints(path)
    assert profile.name == path.stem and profile.source == str(path)
    assert sum(profile.priorities.values()) > 0


def test_edge_cpu_values():
    profile = load_constraints(next(p for p in PROFILES if p.stem == "edge-cpu"))
    assert profile.latency_ms == 20 and profile.hardware.device == "cpu" and profile.max_model_mb == 50
    assert profile.effective_latency_ms == 20  # 40 fps allows 25 ms; the 20 ms budget is tighter
    assert profile.training_time_s == 3600


def test_default_profile_describes_this_machine():
    profile = load_constraints(None)
    assert profile.hardware.cpu_cores >= 1 and profile.latency_ms is None


@pytest.mark.parametrize("text,match", [
    ("latency_ms: 20\nlatncy: 3\n", "Did you mean 'latency_ms'"),
    ("hardware: {device: cpu, cpu_core: 4}\n", "Did you mean 'cpu_cores'"),
    ("priorities: {acuracy: 2}\n", "Did you mean 'accuracy'"),
    ("hardware: {device: tpu}\n", "device must be one of"),
    ("latency_ms: -5\n", "positive number"),
    ("localization: pixel\n", "localization must be one of"),
    ("training_time: soon\n", "not a duration"),
    ("priorities: {accuracy: 0, speed: 0, memory: 0, interpretability: 0, extensibility: 0, robustness: 0}\n",
     "at least one priority"),
    ("data: {kind: fabric}\n", "kind='fabric'"),
    ("data: {knd: texture}\n", "Did you mean 'kind'"),
    ("latency_ms: [20\n", "not valid YAML at line"),
    ("- a\n- b\n", "expected a mapping"),
    ("hardware: {device: cpu, gpu_memory_gb: 8}\n", "set device: gpu"),
])
def test_bad_profiles_are_explained(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_constraints(path)
    assert "bad.yaml" in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_constraints("nope.yaml")


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("30m", 1800), ("90s", 90), ("1h30m", 5400), (45, 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_throughput_implies_latency():
    assert ConstraintProfile(throughput_fps=100).effective_latency_ms == 10


def test_backbone_weights_are_resolved_next_to_the_profile(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))  # a weights file, checked as such
    path = tmp_path / "p.yaml"
    path.write_text("backbone_weights: {mobilenetv2_100: w.safetensors}\n")
    assert load_constraints(path).backbone_weights == {"mobilenetv2_100": str(tmp_path / "w.safetensors")}
    path.write_text("backbone_weights: {resnet18: missing.safetensors}\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_constraints(path)
    (tmp_path / "junk.safetensors").write_bytes(b"x")
    path.write_text("backbone_weights: {resnet18: junk.safetensors}\n")
    with pytest.raises(ConfigError, match="backbone_weights.resnet18: weights file .* is not a safetensors file"):
        load_constraints(path)
