"""The command line: recommend/profile/demo, JSON output, state file, exit codes, fast --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import noise_image, write_image

from automl_ad.cli import EXIT_DATA, EXIT_OK, EXIT_USAGE, main

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from automl_ad.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numpy', 'scipy', 'skimage', 'pandas', 'torch', 'yaml') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_recommend_json_and_state(mvtec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recommend", str(mvtec_dir), "--json", "--top", "3",
                 "--profile", str(PROFILES / "edge-cpu.yaml")]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    category = payload["categories"][0]
    assert category["profile"]["name"] == "part"
    assert len(category["recommendation"]["shortlist"]) == 3
    state = json.loads((tmp_path / ".automl-ad" / "state.json").read_text())
    assert state["categories"][0]["shortlist"] == category["recommendation"]["shortlist"]
    assert Path(state["categories"][0]["profile"]).is_file()


def test_recommend_table_output(mvtec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recommend", str(mvtec_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Memory bank" in out and "shortlist" in out and "structure:" in out


def test_data_problems_exit_3(tmp_path, capsys):
    root = tmp_path / "c"
    (root / "train" / "good").mkdir(parents=True)
    write_image(root / "test" / "crack" / "0.png", noise_image(0))
    assert main(["recommend", str(root)]) == EXIT_DATA
    assert "no usable normal" in capsys.readouterr().err


def test_strict_exit_3_lists_files(mvtec_dir, capsys):
    (mvtec_dir / "train" / "good" / "bad.png").write_bytes(b"")
    assert main(["profile", str(mvtec_dir), "--strict"]) == EXIT_DATA
    assert "bad.png" in capsys.readouterr().err


def test_bad_constraint_profile_exit_2(mvtec_dir, tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("latncy_ms: 3\n")
    assert main(["recommend", str(mvtec_dir), "--profile", str(bad)]) == EXIT_USAGE
    assert "Did you mean 'latency_ms'" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["recommend"])
    assert info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["recommend", "x", "--top", "0"])
    assert info.value.code == EXIT_USAGE


def test_profile_writes_json(mvtec_dir, tmp_path):
    assert main(["profile", str(mvtec_dir), "--out", str(tmp_path / "p.json")]) == EXIT_OK
    assert json.loads((tmp_path / "p.json").read_text())["counts"]["normal_train"] == 6


def test_demo_command_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import automl_ad.data.demo as demo

    original = demo.generate_demo
    monkeypatch.setattr(demo, "generate_demo",
                        lambda out, seed=0: original(out, n_train=12, n_test_good=3, n_test_per_defect=2, size=96,
                                                     seed=seed))
    assert main(["demo", "--out", str(tmp_path / "d"), "--budget", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "texture" in out and "object" in out
    state = json.loads((tmp_path / ".automl-ad" / "state.json").read_text())
    assert {c["category"] for c in state["categories"]} == {"object", "texture"}


def test_fit_then_evaluate(tmp_path, monkeypatch, capsys):
    from automl_ad.data.demo import generate_demo

    monkeypatch.chdir(tmp_path)
    data = generate_demo(tmp_path / "d", categories=("object",), n_train=10, n_test_good=3, n_test_per_defect=2,
                         size=64)["object"]
    model = tmp_path / "model"
    args = ["fit", str(data), "--family", "patchcore", "--param", "backbone=resnet18", "--param", "pretrained=false",
            "--param", "input_size=64", "--param", "feature_strides=[8, 16]", "--out", str(model)]
    assert main(args) == EXIT_OK
    assert json.loads((model / "fit.json").read_text())["n_train"] == 10
    assert main(args) == EXIT_USAGE  # never overwrites an earlier model silently
    capsys.readouterr()
    assert main(["evaluate", str(model), str(data), "--json", "--no-cost"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_test"] == 11 and 0 <= summary["metrics"]["image_auroc"] <= 1
    assert list((model / "evaluation" / "heatmaps").glob("*.png"))


def test_fit_rejects_unknown_family_and_parameters(mvtec_dir, tmp_path, capsys):
    assert main(["fit", str(mvtec_dir), "--family", "patchcor", "--out", str(tmp_path / "m")]) == EXIT_USAGE
    assert "Did you mean 'patchcore'" in capsys.readouterr().err
    assert main(["fit", str(mvtec_dir), "--family", "patchcore", "--param", "coreset=0.1",
                 "--out", str(tmp_path / "m")]) == EXIT_USAGE


def test_automl_ads_own_warnings_read_as_one_line_and_others_keep_pythons_format():
    import io
    import warnings

    import automl_ad.cli as cli

    ours = str(Path(cli.__file__).parent / "deploy" / "package.py")
    theirs, seen = io.StringIO(), []
    cli._show_warning(lambda *a: seen.append(a), UserWarning("model.onnx is not part of the package: x"), UserWarning,
                      ours, 102, file=theirs)
    assert theirs.getvalue() == "warning: model.onnx is not part of the package: x\n" and not seen
    cli._show_warning(lambda *a: seen.append(a), UserWarning("deprecated"), UserWarning, warnings.__file__, 1)
    assert len(seen) == 1 and seen[0][2] == warnings.__file__
