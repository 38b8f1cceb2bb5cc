"""Hostile and careless output locations and values: ``predict`` into a folder of earlier results or inside its
inputs, a non-finite ``--threshold``, ``report --out`` naming a user's file, read-only locations, an empty
``--budget`` and a negative ``--seed``. Every case asserts the message and that nothing of the user's was lost."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path

import pytest
from conftest import noise_image, write_image

from automl_ad.cli import EXIT_OK, EXIT_USAGE, main
from automl_ad.data.imageset import ImageSet
from automl_ad.deploy.package import export_package
from automl_ad.detectors import create_detector

pytestmark = [pytest.mark.filterwarnings("ignore:model.onnx is not part of the package"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

THRESHOLDS = {"image": {"value": 0.5, "method": "empirical", "target_false_alarm_rate": 0.01}, "active": "image"}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    train = ImageSet.from_arrays([noise_image(i, size=32) for i in range(6)])
    detector = create_detector("gaussian", input_size=32, scales=(1.0,)).fit(train)
    return export_package(detector, tmp_path_factory.mktemp("package") / "pkg", THRESHOLDS)


def images(folder: Path, count: int, seed: int = 0) -> Path:
    for i in range(count):
        write_image(folder / f"part{i}.png", noise_image(seed + i, size=32))
    return folder


def predicted(out: Path) -> list[str]:
    with (out / "predictions.csv").open() as handle:
        return [Path(row["image"]).name for row in csv.DictReader(handle)]


def test_predict_refuses_earlier_results_without_overwrite_and_replaces_them_whole_with_it(package, tmp_path, capsys):
    eight, four = images(tmp_path / "eight", 8), images(tmp_path / "four", 4, seed=50)
    out = tmp_path / "out"
    assert main(["predict", str(package), str(eight), "--out", str(out)]) == EXIT_OK
    (out / "notes.txt").write_text("the user's")
    before = (out / "predictions.csv").read_text()
    capsys.readouterr()
    assert main(["predict", str(package), str(four), "--out", str(out)]) == EXIT_USAGE
    assert "earlier predict's results; pass --overwrite" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == before and len(list((out / "overlays").iterdir())) == 8
    assert main(["predict", str(package), str(four), "--out", str(out), "--overwrite"]) == EXIT_OK
    assert predicted(out) == [f"part{i}.png" for i in range(4)]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{i:05d}_part{i}.png" for i in range(4)]
    assert (out / "notes.txt").read_text() == "the user's"  # only what predict wrote is replaced


def test_predict_refuses_an_output_folder_whose_result_names_are_the_users(package, tmp_path, capsys):
    out = tmp_path / "mine"
    write_image(out / "masks" / "my_mask.png", noise_image(1, size=8))
    assert main(["predict", str(package), str(images(tmp_path / "in", 2)), "--out", str(out), "--overwrite"]) \
        == EXIT_USAGE
    assert "which an earlier predict did not write" in capsys.readouterr().err
    assert [p.name for p in (out / "masks").iterdir()] == ["my_mask.png"]


def test_predict_refuses_an_output_folder_inside_an_input_and_skips_earlier_output_there(package, tmp_path, capsys):
    parts = images(tmp_path / "parts", 3)
    for out in (parts, parts / "predictions"):
        assert main(["predict", str(package), str(parts), "--out", str(out)]) == EXIT_USAGE
        assert "lies inside the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in parts.iterdir()) == ["part0.png", "part1.png", "part2.png"]
    # output an earlier version left inside the inputs is not scored as parts
    assert main(["predict", str(package), str(parts), "--out", str(tmp_path / "first")]) == EXIT_OK
    os.replace(tmp_path / "first", parts / "first")
    capsys.readouterr()
    assert main(["predict", str(package), str(parts), "--out", str(tmp_path / "second")]) == EXIT_OK
    assert f"skipping {parts / 'first'}: it holds an earlier predict's output" in capsys.readouterr().err
    assert predicted(tmp_path / "second") == ["part0.png", "part1.png", "part2.png"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_predict_refuses_a_threshold_that_is_not_a_finite_number(package, tmp_path, capsys, value):
    assert main(["predict", str(package), str(images(tmp_path / "in", 1)), "--out", str(tmp_path / "out"),
                 f"--threshold={value}"]) == EXIT_USAGE
    assert "--threshold must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_report_out_never_replaces_a_file_that_is_not_a_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    victim = write_image(tmp_path / "part.png", noise_image(3, size=16))
    before = victim.read_bytes()
    assert main(["report", "--out", str(victim)]) == EXIT_USAGE
    assert "is not an automl-ad report" in capsys.readouterr().err and victim.read_bytes() == before
    earlier = tmp_path / "report.html"  # an earlier report may be replaced: the refusal is then the missing store's
    earlier.write_text("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>automl-ad report — x")
    main(["report", "--out", str(earlier)])
    assert "is not an automl-ad report" not in capsys.readouterr().err


def test_unwritable_output_locations_are_refused_before_any_work(package, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    inputs = images(tmp_path / "in", 1)
    for argv in (["predict", str(package), str(inputs), "--out", str(tmp_path / "locked" / "p")],
                 ["report", "--out", str(tmp_path / "locked" / "r.html")],
                 ["export", "--best", str(tmp_path / "locked" / "pkg")]):
        assert main(argv) == EXIT_USAGE
        assert "is not writable (read-only file system or no permission)" in capsys.readouterr().err


def test_a_read_only_file_system_met_mid_command_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    import errno

    import automl_ad.journey as journey

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".automl-ad"))
    monkeypatch.setattr(journey, "profile_data", read_only)
    assert main(["profile", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Read-only file system" in err and ".automl-ad" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [(["--budget", ""], "'' is not a duration"),
                                           (["--seed", "-1"], "must be 0 or more")])
def test_search_refuses_an_empty_budget_and_a_negative_seed(mvtec_dir, tmp_path, monkeypatch, capsys, argv,
                                                            message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if argv[0] == "--seed" else contextlib.nullcontext():  # argparse's own exit
        assert main(["search", str(mvtec_dir), *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / ".automl-ad").exists()  # refused before any search started


def test_predictions_json_stays_strict_json(package, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(package), str(images(tmp_path / "in", 2)), "--out", str(out)]) == EXIT_OK
    json.loads((out / "predictions.json").read_text(), parse_constant=lambda name: pytest.fail(name))


def test_a_fitted_model_folder_gets_the_permissions_open_gives(mvtec_dir, tmp_path, monkeypatch):
    import stat

    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        assert main(["fit", str(mvtec_dir), "--family", "gaussian", "--param", "input_size=32", "--param",
                     "scales=[1.0]", "--out", str(tmp_path / "model")]) == EXIT_OK
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir() if p.is_file()}
    assert "tensors.safetensors" in modes and set(modes.values()) == {0o644}, modes  # safetensors wrote 0600


def test_recommend_says_when_search_will_refuse_the_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images(tmp_path / "two" / "train" / "good", 2)
    assert main(["recommend", str(tmp_path / "two"), "--no-screen"]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())  # as read, not as wrapped
    assert "`automl-ad search` will refuse this data" in out and "2 normal image(s) are too few" in out
    assert main(["search", str(tmp_path / "two"), "--budget", "1m"]) == EXIT_USAGE
    assert "2 normal image(s) are too few" in capsys.readouterr().err
