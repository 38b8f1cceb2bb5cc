"""The built-in ImageNet MobileNetV2: used offline when nothing else is available, said so, and a known weights
file passed to `fit --weights` brings its own backbone."""

from __future__ import annotations

import json

import pytest

from automl_ad.cli import main
from automl_ad.data.demo import generate_demo
from automl_ad.defaults import BUILTIN_BACKBONE
from automl_ad.features import backbone as backbone_module
from automl_ad.features.backbone import builtin_weights_file, file_sha256, load_extractor, uses_builtin_weights


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo"), categories=["texture"], n_train=6, n_test_good=2,
                         n_test_per_defect=1, size=48)["texture"]


def test_builtin_weights_ship_with_the_package_and_are_known():
    path = builtin_weights_file()
    assert path.is_file() and path.stat().st_size > 10_000_000
    assert backbone_module.known_weights()[file_sha256(str(path))]["model"] == BUILTIN_BACKBONE


def test_offline_the_builtin_backbone_loads_real_weights(offline):
    assert uses_builtin_weights(BUILTIN_BACKBONE) and not uses_builtin_weights("resnet18")
    extractor = load_extractor(BUILTIN_BACKBONE, (8, 16), 64)
    assert extractor.spec.weights.file == str(builtin_weights_file().resolve())
    assert extractor.spec.weights.mean == (0.5, 0.5, 0.5)  # the file's own normalisation, from weights.yaml


def test_offline_fit_without_weights_falls_back_to_the_builtin_backbone(offline, texture, tmp_path, capsys):
    assert main(["fit", str(texture), "--family", "padim", "--param", "input_size=64", "--out",
                 str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "built into automl-ad" in out and BUILTIN_BACKBONE in out
    assert json.loads((tmp_path / "model" / "detector.json").read_text())["params"]["backbone"] == BUILTIN_BACKBONE


def test_fit_with_a_known_weights_file_uses_its_backbone(texture, tmp_path, capsys):
    assert main(["fit", str(texture), "--family", "padim", "--param", "input_size=64", "--weights",
                 str(builtin_weights_file()), "--out", str(tmp_path / "model")]) == 0
    assert f"uses backbone {BUILTIN_BACKBONE}" in capsys.readouterr().out
    assert json.loads((tmp_path / "model" / "detector.json").read_text())["params"]["backbone"] == BUILTIN_BACKBONE


def test_an_explicit_backbone_without_weights_offline_is_a_clear_error(offline, texture, tmp_path, capsys):
    assert main(["fit", str(texture), "--family", "padim", "--param", "backbone=resnet18", "--param",
                 "input_size=64", "--out", str(tmp_path / "model")]) != 0
    assert "--weights" in capsys.readouterr().err
