"""Hostile weights and backbones: a corrupt, truncated, empty or foreign weights file (``--weights`` or a profile's
``backbone_weights``) and a backbone name that is no timm model each end in one clear message naming what is wrong,
with exit code 2 (a usage or configuration error), never a loader's traceback; the offline fallback to the built-in
backbone runs on the weights the profile names for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, run_cli, write_image

from automl_ad.cli import EXIT_USAGE
from automl_ad.defaults import BUILTIN_BACKBONE
from automl_ad.errors import UsageError
from automl_ad.features import backbone as backbone_module
from automl_ad.features.backbone import (
    BackboneWeightsError,
    UnknownBackboneError,
    backbone_fallback,
    backbone_of_weights,
    builtin_weights_file,
    check_weights_file,
    load_extractor,
    resolve_weights,
)


@pytest.fixture
def part(tmp_path) -> Path:
    """A tiny MVTec-style category: 4 normal training images, test images of both kinds."""
    root = tmp_path / "part"
    for i in range(4):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", noise_image(100 + i))
        write_image(root / "test" / "crack" / f"{i:03d}.png", noise_image(200 + i))
    return root


def small_safetensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"conv.weight": np.zeros((4, 3, 3, 3), np.float32), "conv.bias": np.ones(4, np.float32)}, str(path))
    return path


def small_torch_file(path: Path) -> Path:
    import torch

    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.ones(4)}, path)
    return path


def profile_file(tmp_path: Path, backbone: str, weights: Path) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(f"name: mine\nbackbone_weights: {{{backbone}: {weights}}}\n")
    return path


# --- what the one check says about each kind of bad file ----------------------------------------------------------

def _garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_text("garbage\n")  # `echo garbage > bad.safetensors`
    return path


def _empty_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")
    return path


def _truncated_data(tmp_path):
    whole = small_safetensors(tmp_path / "whole.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:-40])
    return path


def _truncated_header(tmp_path):
    whole = small_safetensors(tmp_path / "whole.safetensors").read_bytes()
    path = tmp_path / "cut_header.safetensors"
    path.write_bytes(whole[:30])
    return path


def _invalid_header(tmp_path):
    header = b'{"a": not json}'
    path = tmp_path / "header.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def _torch_named_safetensors(tmp_path):
    return small_torch_file(tmp_path / "torch.safetensors")


def _safetensors_named_pth(tmp_path):
    return small_safetensors(tmp_path / "weights.pth")


def _truncated_torch(tmp_path):
    whole = small_torch_file(tmp_path / "whole.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _image(tmp_path):
    image = write_image(tmp_path / "x.png", noise_image(0))
    path = tmp_path / "image.pth"
    path.write_bytes(image.read_bytes())
    return path


def _folder(tmp_path):
    path = tmp_path / "folder.safetensors"
    path.mkdir()
    return path


@pytest.mark.parametrize("make, problem", [
    (_garbage, "is not a safetensors file"),
    (_empty_yaml, "is empty (0 bytes)"),
    (_truncated_data, "is truncated"),
    (_truncated_header, "is truncated"),
    (_invalid_header, "invalid safetensors header"),
    (_torch_named_safetensors, "rename it to end in .pth"),
    (_safetensors_named_pth, "rename it to end in .safetensors"),
    (_truncated_torch, "damaged or truncated PyTorch file"),
    (_image, "neither a PyTorch (torch.save) nor a safetensors weights file (it is an image)"),
    (_folder, "is not a file"),
])
def test_a_bad_weights_file_is_named_with_what_is_wrong(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(BackboneWeightsError) as caught:
        check_weights_file(path)
    message = str(caught.value)
    assert str(path) in message and problem in message
    assert caught.value.exit_code == EXIT_USAGE
    with pytest.raises(BackboneWeightsError, match="timm.create_model"):  # what to do
        check_weights_file(path, "resnet18")
    # every place that takes a weights file makes the same check
    with pytest.raises(BackboneWeightsError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        backbone_of_weights(path)
    with pytest.raises(BackboneWeightsError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        resolve_weights("resnet18", str(path), True)


def test_good_weights_files_pass_the_check(tmp_path):
    assert check_weights_file(small_safetensors(tmp_path / "w.safetensors")) is None  # unknown file: no model
    assert check_weights_file(small_torch_file(tmp_path / "w.pth")) is None
    assert check_weights_file(builtin_weights_file(), BUILTIN_BACKBONE) == BUILTIN_BACKBONE


def test_a_weights_file_of_another_network_fails_with_a_clear_message(tmp_path):
    """A valid weights file that holds other tensors is refused when it is loaded, naming file and backbone: timm
    would load none of them into a feature network and leave it random, without a word."""
    from safetensors.numpy import save_file

    path = small_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(BackboneWeightsError, match=r"does not fit backbone resnet18: it lacks") as caught:
        load_extractor("resnet18", (8, 16), 32, weights=str(path), device="cpu")
    assert str(path) in str(caught.value)
    misshapen = tmp_path / "misshapen.safetensors"  # the right name, the wrong shape
    save_file({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)}, str(misshapen))
    with pytest.raises(BackboneWeightsError, match=r"does not fit backbone resnet18 \(.*size mismatch"):
        load_extractor("resnet18", (8, 16), 32, weights=str(misshapen), device="cpu")


# --- the command line: exit code 2, said before any work -------------------------------------------------------

def test_fit_with_a_corrupt_weights_file_is_refused_before_fitting(part, tmp_path, capsys, offline):
    bad = _garbage(tmp_path)
    code, out, err = run_cli(capsys, "fit", part, "--family", "padim", "--weights", bad, "--out", tmp_path / "m")
    assert code == EXIT_USAGE
    assert str(bad.name) in err and "is not a safetensors file" in err and "Fitting" not in out
    assert not (tmp_path / "m").exists()


def test_recommend_and_fit_refuse_a_corrupt_weights_file_alike(part, tmp_path, capsys, monkeypatch, offline):
    bad = _truncated_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, recommend_err = run_cli(capsys, "recommend", part, "--weights", bad, "--no-screen")
    assert code == EXIT_USAGE and "is truncated" in recommend_err
    code, _, fit_err = run_cli(capsys, "fit", part, "--family", "padim", "--weights", bad, "--out", tmp_path / "m")
    assert code == EXIT_USAGE and "is truncated" in fit_err
    assert recommend_err.split(str(bad.name))[1] == fit_err.split(str(bad.name))[1]  # one check, one message


def test_fit_with_a_profile_naming_a_non_weights_file(part, tmp_path, capsys, offline):
    profile = profile_file(tmp_path, BUILTIN_BACKBONE, _empty_yaml(tmp_path))
    code, out, err = run_cli(capsys, "fit", part, "--family", "padim", "--param", f"backbone={BUILTIN_BACKBONE}",
                             "--profile", profile, "--out", tmp_path / "m")
    assert code == EXIT_USAGE and "empty.yaml" in err and "is empty (0 bytes)" in err
    assert "Fitting" not in out and not (tmp_path / "m").exists()


def test_recommend_refuses_a_profile_naming_a_non_weights_file(part, tmp_path, capsys, monkeypatch, offline):
    profile = profile_file(tmp_path, BUILTIN_BACKBONE, _empty_yaml(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "recommend", part, "--profile", profile, "--no-screen")
    assert code == EXIT_USAGE and "empty.yaml" in err and "is empty (0 bytes)" in err
    assert "weights here" not in out


def test_fit_with_a_profile_mapping_a_backbone_to_another_networks_weights_exits_2(part, tmp_path, capsys, offline):
    profile = profile_file(tmp_path, "resnet18", builtin_weights_file())
    code, out, err = run_cli(capsys, "fit", part, "--family", "padim", "--param", "backbone=resnet18",
                             "--profile", profile, "--out", tmp_path / "m")
    assert code == EXIT_USAGE and f"holds {BUILTIN_BACKBONE} weights, not resnet18" in err
    assert "Fitting" not in out


def test_backbone_weights_errors_are_configuration_errors():
    assert issubclass(BackboneWeightsError, UsageError) and BackboneWeightsError.exit_code == EXIT_USAGE == 2


# --- a backbone name that is no timm model -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/passwd", "resnt18", "resnet18;rm"])
def test_fit_with_an_unknown_backbone_says_so(part, tmp_path, capsys, offline, name):
    code, out, err = run_cli(capsys, "fit", part, "--family", "padim", "--param", f"backbone={name}",
                             "--out", tmp_path / "m")
    assert code == EXIT_USAGE
    assert f"unknown backbone {name!r}" in err and "not the name of a timm model" in err
    assert f"knows weights for: {BUILTIN_BACKBONE}" in err
    assert "no pretrained weights" not in err and "Fitting" not in out
    if name == "resnt18":
        assert "Did you mean 'resnet18'" in err


def test_an_unknown_backbone_is_a_usage_error_in_python_too(offline):
    with pytest.raises(UnknownBackboneError, match="unknown backbone '../../etc/passwd'") as caught:
        resolve_weights("../../etc/passwd", None, True)
    assert isinstance(caught.value, UsageError) and not isinstance(caught.value, BackboneWeightsError)
    resolve_weights("resnet18", None, False)  # real names, with a pretrained tag too, pass
    resolve_weights("resnet18.a1_in1k", None, False)


# --- the offline fallback to the built-in backbone ---------------------------------------------------------------

@pytest.fixture
def no_hub_weights(monkeypatch, offline):
    monkeypatch.setattr(backbone_module, "hub_weights_cached", lambda backbone: False)


def test_the_fallback_runs_on_the_weights_the_profile_names_for_it(tmp_path, no_hub_weights):
    own = str(tmp_path / "my_mobilenet.safetensors")
    small_safetensors(Path(own))
    settings, note = backbone_fallback("patchcore", "wide_resnet50_2", {BUILTIN_BACKBONE: own})
    assert settings == {"backbone": BUILTIN_BACKBONE, "weights": own}
    assert own in note and "built into automl-ad" not in note
    settings, note = backbone_fallback("patchcore", "wide_resnet50_2", {})
    assert settings == {"backbone": BUILTIN_BACKBONE} and "built into automl-ad" in note
    assert backbone_fallback("patchcore", "wide_resnet50_2", {"wide_resnet50_2": own}) is None  # its own file
    assert backbone_fallback("padim", BUILTIN_BACKBONE, {}) is None  # the default runs (built in)
    with pytest.raises(BackboneWeightsError, match="is empty"):
        backbone_fallback("patchcore", "wide_resnet50_2", {BUILTIN_BACKBONE: str(_empty_yaml(tmp_path))})


def test_fit_falls_back_to_the_profiles_own_weights(part, tmp_path, capsys, no_hub_weights):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(BUILTIN_BACKBONE, pretrained=False)
    own = tmp_path / "my_mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(own))
    profile = profile_file(tmp_path, BUILTIN_BACKBONE, own)
    code, out, _ = run_cli(capsys, "fit", part, "--family", "padim", "--param", "input_size=32", "--profile",
                           profile, "--out", tmp_path / "m")  # padim's default backbone: resnet18, no weights here
    assert code == 0 and str(own) in out and "built into automl-ad" not in out
    params = json.loads((tmp_path / "m" / "detector.json").read_text())["params"]
    assert params["backbone"] == BUILTIN_BACKBONE and params["weights"] == str(own)
