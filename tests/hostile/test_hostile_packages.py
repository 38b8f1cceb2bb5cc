"""Hostile and careless use of packages: export targets that hold user data, failures mid-export, tampered or
crafted manifests, symbolic links, pickled weights, bad images in a predict batch, ``fit --out`` misuse.

Every case asserts the error message and that nothing was lost (user files still there, old package intact)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, write_image

from automl_ad import load_package
from automl_ad.cli import EXIT_OK, EXIT_USAGE, main
from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import PACKAGE_KEY_ENV
from automl_ad.deploy.package import PackageError, check_package_target, export_package
from automl_ad.deploy.predict import predict_files
from automl_ad.detectors import create_detector
from automl_ad.errors import UsageError

pytestmark = [pytest.mark.filterwarnings("ignore:model.onnx is not part of the package"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

THRESHOLDS = {"image": {"value": 0.5, "method": "empirical", "target_false_alarm_rate": 0.01}, "active": "image"}


@pytest.fixture(scope="module")
def detector():
    train = ImageSet.from_arrays([noise_image(i, size=32) for i in range(6)])
    return create_detector("gaussian", input_size=32, scales=(1.0,)).fit(train)


@pytest.fixture(scope="module")
def golden(detector, tmp_path_factory):
    return export_package(detector, tmp_path_factory.mktemp("golden") / "pkg", THRESHOLDS)


@pytest.fixture
def package(golden, tmp_path):
    return Path(shutil.copytree(golden, tmp_path / "pkg"))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (to show nothing was lost or changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> dict:
    """A folder of the user's own files, including an automl-ad working state with a tracking store."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "plan.txt").write_text("my plan")
    (path / "photo.png").write_bytes(b"\x89PNG user data")
    (path / ".automl-ad").mkdir()
    (path / ".automl-ad" / "mlflow.db").write_bytes(b"SQLite format 3\x00 store")
    return snapshot(path)


def reseal(path: Path, change) -> None:
    """Apply ``change`` to the manifest and recompute its integrity hash, as someone crafting a package would."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    core = {k: v for k, v in manifest.items() if k != "integrity"}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    manifest["integrity"]["core_sha256"] = hashlib.sha256(canonical).hexdigest()  # an HMAC, if any, stays as it was
    (path / "manifest.json").write_text(json.dumps(manifest))


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


# --- export targets --------------------------------------------------------------------------------------------
def test_export_into_the_working_directory_is_refused(detector, tmp_path, monkeypatch):
    work = tmp_path / "project"
    before = user_folder(work)
    monkeypatch.chdir(work)
    with pytest.raises(UsageError, match="working directory or one of its parents"):
        export_package(detector, ".", THRESHOLDS, overwrite=True)
    assert snapshot(work) == before and no_leftovers(tmp_path)


def test_export_into_a_parent_of_the_working_directory_is_refused(detector, tmp_path, monkeypatch):
    before = user_folder(tmp_path / "project")
    (tmp_path / "project" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "project" / "sub")
    with pytest.raises(UsageError, match="working directory or one of its parents"):
        export_package(detector, "..", THRESHOLDS, overwrite=True)
    assert snapshot(tmp_path / "project") == before


def test_export_into_home_or_root_is_refused(detector, tmp_path, monkeypatch):
    home = tmp_path / "home"
    before = user_folder(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="home folder, the filesystem root"):
        export_package(detector, home, THRESHOLDS, overwrite=True)
    with pytest.raises(UsageError, match="home folder, the filesystem root"):
        check_package_target("/", overwrite=True)
    assert snapshot(home) == before


def test_overwrite_refuses_a_non_empty_user_folder(detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "report.docx").write_bytes(b"user report")
    (folder / "manifest.json").write_text('{"kind": "something-else"}')
    before = snapshot(folder)
    with pytest.raises(UsageError, match="is not an automl-ad package .*does not say \"kind\""):
        export_package(detector, folder, THRESHOLDS, overwrite=True)
    assert snapshot(folder) == before and no_leftovers(tmp_path)


def test_overwrite_refuses_a_package_folder_holding_user_files_or_a_store(detector, package, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (package / "my-notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="it also holds my-notes.txt"):
        export_package(detector, package, THRESHOLDS, overwrite=True)
    (package / "my-notes.txt").unlink()
    (package / ".automl-ad").mkdir()
    (package / ".automl-ad" / "mlflow.db").write_bytes(b"store")
    before = snapshot(package)
    with pytest.raises(UsageError, match=r"holds a tracking store or automl-ad's working state \(\.automl-ad\)"):
        export_package(detector, package, THRESHOLDS, overwrite=True)
    assert snapshot(package) == before


def test_export_refuses_a_folder_holding_a_protected_path(detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "runs" / "deep" / "mlflow-store.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"store")
    with pytest.raises(UsageError, match="which automl-ad needs"):
        export_package(detector, tmp_path / "runs", THRESHOLDS, overwrite=True, protected=(store,))
    assert store.read_bytes() == b"store"


def test_export_onto_an_existing_file_is_refused(detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "model.bin"
    target.write_bytes(b"important")
    with pytest.raises(UsageError, match="is an existing file, not a folder"):
        export_package(detector, target, THRESHOLDS, overwrite=True)
    assert target.read_bytes() == b"important" and no_leftovers(tmp_path)


def test_export_onto_a_package_needs_overwrite_and_then_replaces_it(detector, package, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="already holds an automl-ad package; pass --overwrite"):
        export_package(detector, package, THRESHOLDS)
    raised = {"image": {**THRESHOLDS["image"], "value": 0.75}}
    export_package(detector, package, raised, overwrite=True)
    assert load_package(package).image_threshold == 0.75 and no_leftovers(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert package.stat().st_mode & 0o777 == 0o777 & ~umask  # readable as the umask allows, not 0700


def test_failure_mid_export_keeps_the_old_package(detector, package, tmp_path, monkeypatch):
    import automl_ad.deploy.package as package_module

    monkeypatch.chdir(tmp_path)
    before = snapshot(package)

    def broken_onnx(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package_module, "export_onnx", broken_onnx)
    with pytest.raises(OSError, match="No space left"):
        export_package(detector, package, THRESHOLDS, overwrite=True)
    assert snapshot(package) == before and no_leftovers(tmp_path)
    assert load_package(package).image_threshold == 0.5


def test_failed_swap_puts_the_old_package_back(detector, package, tmp_path, monkeypatch):
    from automl_ad import folders

    monkeypatch.chdir(tmp_path)
    before = snapshot(package)
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append((Path(source).name, Path(target).name))
        if ".staging-" in Path(source).name:  # the old package is aside; renaming the new one in fails
            raise OSError(5, "Input/output error")
        real_rename(source, target)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        export_package(detector, package, THRESHOLDS, overwrite=True)
    aside, failed, back = calls[-3:]
    assert aside[0] == "pkg" and ".staging-" in failed[0] and back == (aside[1], "pkg")
    assert snapshot(package) == before and no_leftovers(tmp_path)


# --- integrity and signatures -----------------------------------------------------------------------------------
def test_raised_threshold_in_the_manifest_is_refused(package):
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["thresholds"]["image"]["value"] = 1e9
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(PackageError, match=r"manifest.json was changed after export .*integrity.core_sha256"):
        load_package(package)


def test_signed_package_needs_the_key(detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PACKAGE_KEY_ENV, "factory-secret")
    signed = export_package(detector, tmp_path / "signed", THRESHOLDS)
    assert load_package(signed).image_threshold == 0.5
    reseal(signed, lambda m: m["thresholds"]["image"].update(value=1e9))  # a forger recomputes the plain hash
    with pytest.raises(PackageError, match="signature does not match the key in AUTOML_AD_PACKAGE_KEY"):
        load_package(signed)
    monkeypatch.delenv(PACKAGE_KEY_ENV)
    assert load_package(signed).image_threshold == 1e9  # documented: without the key only naive edits are caught
    unsigned = export_package(detector, tmp_path / "unsigned", THRESHOLDS)
    monkeypatch.setenv(PACKAGE_KEY_ENV, "factory-secret")
    with pytest.raises(PackageError, match="AUTOML_AD_PACKAGE_KEY is set but the package is not signed"):
        load_package(unsigned)
    monkeypatch.setenv(PACKAGE_KEY_ENV, "another-secret")
    export_package(detector, tmp_path / "other", THRESHOLDS)
    monkeypatch.setenv(PACKAGE_KEY_ENV, "factory-secret")
    with pytest.raises(PackageError, match="signed with another key"):
        load_package(tmp_path / "other")


def _set(path: str, value):
    def change(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value
    return change


@pytest.mark.parametrize("name, change, message", [
    ("nan threshold", _set("thresholds.image.value", float("nan")), "'thresholds.image.value' must be a finite"),
    ("string threshold", _set("thresholds.image.value", "0.5"), "'thresholds.image.value' must be a finite"),
    ("no image threshold", lambda m: m["thresholds"].pop("image"), "'thresholds.image' is missing"),
    ("bad rate", _set("thresholds.image.target_false_alarm_rate", 5), "target_false_alarm_rate' must be a number"),
    ("active names nothing", _set("thresholds.active", "pixel"), "'thresholds.active' names 'pixel'"),
    ("unknown family", _set("family", "trojan"), "'family' names 'trojan', not a known family"),
    ("thresholds a list", _set("thresholds", [0.5]), "'thresholds' must be a JSON object, not array"),
    ("missing params", lambda m: m.pop("params"), "'params' is missing"),
    ("extra field", _set("run_this", "rm -rf /"), "'run_this' is not a field of this format"),
    ("path traversal", lambda m: m["files"].update({"../../etc/passwd": "0" * 64}),
     r"'files\.\.\./\.\./etc/passwd' is not a package file"),
    ("bad digest", lambda m: m["files"].update({"detector.json": "abc"}), "'files.detector.json' must be a sha256"),
    ("input size", _set("preprocessing.input_size", -3), "'preprocessing.input_size' must be a positive"),
    ("mean", _set("preprocessing.mean", [0.5, "x"]), "'preprocessing.mean' must be a list of 3 finite"),
    ("localisation", _set("supports_localization", "yes"), "'supports_localization' must be a JSON boolean"),
    ("onnx file", _set("onnx", {"file": "/tmp/evil.onnx"}), "'onnx.file' must be model.onnx"),
    ("cost", _set("cost.latency_ms_p50", {"x": 1}), "'cost.latency_ms_p50' must be a number or null"),
    ("other params", _set("params.input_size", 64), "detector.json describes another detector"),
])
def test_crafted_manifest_fields_are_refused_by_name(package, name, change, message):
    reseal(package, change)
    with pytest.raises(PackageError, match=message):
        load_package(package)


@pytest.mark.parametrize("content, message", [
    (b"[1, 2, 3]", "manifest.json holds a JSON list, not an object"),
    (b'"a string"', "manifest.json holds a JSON str, not an object"),
    (b"{not json", "manifest.json is not valid JSON"),
    (b'{"kind": "automl-ad-package", "kind": "automl-ad-package"}', "the key 'kind' appears twice"),
    (b"\xff\xfe\x00garbage", "manifest.json is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "manifest.json is not valid JSON"),
    (b'{"a": "' + b"x" * (2 << 20) + b'"}', "manifest.json is larger than 1 MiB"),
    (b'{"format_version": 2}', 'does not say "kind": "automl-ad-package"'),
    (b'{"format_version": 1, "files": {}}', "package format 1; .* Export it again"),
    (b'{"kind": "automl-ad-package", "format_version": 2}', "'automl_ad_version' is missing"),
])
def test_malformed_manifest_gives_a_package_error(package, content, message):
    (package / "manifest.json").write_bytes(content)
    with pytest.raises(PackageError, match=message):
        load_package(package)


# --- what the package folder holds -----------------------------------------------------------------------------
def test_symbolic_links_in_a_package_are_refused(package, tmp_path):
    outside = tmp_path / "outside.md"
    shutil.move(package / "README.md", outside)
    (package / "README.md").symlink_to(outside)  # same bytes, so its sha256 still matches
    with pytest.raises(PackageError, match="README.md is a symbolic link"):
        load_package(package)
    assert outside.is_file()
    (package / "README.md").unlink()
    shutil.copyfile(outside, package / "README.md")
    load_package(package)
    (package / "secrets").symlink_to("/etc")  # an unlisted link is refused too
    with pytest.raises(PackageError, match="secrets is a symbolic link"):
        load_package(package)


def test_a_listed_file_that_is_not_a_regular_file_is_refused(package):
    (package / "README.md").unlink()
    (package / "README.md").mkdir()
    with pytest.raises(PackageError, match="README.md is not a regular file"):
        load_package(package)
    (package / "README.md").rmdir()
    os.mkfifo(package / "README.md")  # would block a plain open()
    with pytest.raises(PackageError, match="README.md is not a regular file"):
        load_package(package)


class _Payload:
    """A pickle that creates a file when unpickled (what a malicious .pth can do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("listed", [True, False])
def test_pickled_backbone_weights_never_reach_torch_load(tmp_path, monkeypatch, listed):
    import torch

    monkeypatch.chdir(tmp_path)
    train = ImageSet.from_arrays([noise_image(i, size=32) for i in range(4)])
    detector = create_detector("padim", backbone="resnet18", pretrained=False, input_size=32,
                               feature_strides=(4, 8)).fit(train)
    path = export_package(detector, tmp_path / "pkg", THRESHOLDS)
    marker = tmp_path / "code-ran"
    (path / "backbone.pth").write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    digest = hashlib.sha256((path / "backbone.pth").read_bytes()).hexdigest()
    record = json.loads((path / "detector.json").read_text())
    record["params"].update(weights="backbone.pth", pretrained=True)
    (path / "detector.json").write_text(json.dumps(record))

    def craft(manifest):
        manifest["params"] = record["params"]
        manifest["files"]["detector.json"] = hashlib.sha256((path / "detector.json").read_bytes()).hexdigest()
        if listed:
            manifest["files"]["backbone.pth"] = digest

    reseal(path, craft)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    message = r"'files.backbone.pth' is not a package file" if listed else \
        r"'params.weights' names 'backbone.pth'.*torch.load"
    with pytest.raises(PackageError, match=message):
        load_package(path)
    assert not loads and not marker.exists()


# --- predict ---------------------------------------------------------------------------------------------------
def _png_bomb(path: Path, side: int = 30000) -> Path:
    """A PNG whose header declares side x side gray pixels (900 million), with a token IDAT: only the header
    must be read for it to be refused."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
                     + chunk(b"IEND", b""))
    return path


def test_predict_batch_with_a_bomb_and_a_corrupt_image_scores_the_rest(package, tmp_path):
    images = tmp_path / "images"
    good = [write_image(images / f"good{i}.png", noise_image(50 + i, size=32)) for i in range(2)]
    bomb = _png_bomb(images / "bomb.png")
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = predict_files(load_package(package), [str(images)], tmp_path / "out", progress=False)
    by_name = {Path(r["image"]).name: r for r in rows}
    assert by_name["bomb.png"]["verdict"] == "error" and "decompression bombs" in by_name["bomb.png"]["error"]
    assert by_name["corrupt.png"]["verdict"] == "error" and by_name["corrupt.png"]["error"]
    assert all(by_name[p.name]["verdict"] in ("normal", "anomalous") for p in good)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        written = {Path(r["image"]).name: r for r in csv.DictReader(handle)}
    assert set(written) == {"good0.png", "good1.png", "bomb.png", "corrupt.png"}
    assert written["bomb.png"]["verdict"] == "error" and float(written["good0.png"]["score"]) >= 0
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == rows
    assert bomb.stat().st_size < 10_000 and corrupt.is_file()  # inputs untouched


def test_predict_cli_reports_skips_without_markup_and_refuses_a_file_as_out(package, tmp_path, capsys):
    images = tmp_path / "in[/red]"  # rich markup in a path must be printed, not parsed
    write_image(images / "ok.png", noise_image(7, size=32))
    (images / "bad.png").write_bytes(b"junk")
    assert main(["predict", str(package), str(images), "--out", str(tmp_path / "out")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "skipped" in out and "[/red]" in out and "bad.png" in out and "1 images scored" in out
    assert "the model's median time per image" in out
    (tmp_path / "taken.csv").write_text("user data")
    assert main(["predict", str(package), str(images), "--out", str(tmp_path / "taken.csv")]) == EXIT_USAGE
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "taken.csv").read_text() == "user data"


# --- fit --out -------------------------------------------------------------------------------------------------
def test_fit_out_misuse_is_refused_without_losing_files(mvtec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", str(mvtec_dir), "--family", "gaussian", "--param", "input_size=32", "--param", "scales=[1.0]"]
    (tmp_path / "model.bin").write_bytes(b"not yours")
    assert main([*fit, "--out", str(tmp_path / "model.bin"), "--overwrite"]) == EXIT_USAGE
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "model.bin").read_bytes() == b"not yours"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main([*fit, "--out", str(mine), "--overwrite"]) == EXIT_USAGE
    assert "is not an automl-ad model (it holds thesis.tex)" in capsys.readouterr().err
    assert main([*fit, "--out", ".", "--overwrite"]) == EXIT_USAGE
    assert "working directory" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_fit_overwrite_replaces_only_an_earlier_model(mvtec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    fit = ["fit", str(mvtec_dir), "--family", "gaussian", "--param", "input_size=32", "--param", "scales=[1.0]",
           "--out", str(model)]
    assert main(fit) == EXIT_OK
    (model / "evaluation").mkdir()
    (model / "evaluation" / "metrics.json").write_text("{}")
    assert main(fit) == EXIT_USAGE
    assert "already holds an automl-ad model; pass --overwrite" in capsys.readouterr().err
    (model / "evaluation" / "mlruns").mkdir()  # a store anywhere inside is never deleted
    assert main([*fit, "--overwrite"]) == EXIT_USAGE
    assert "holds a tracking store or automl-ad's working state (evaluation/mlruns)" in capsys.readouterr().err
    (model / "evaluation" / "mlruns").rmdir()
    assert main([*fit, "--overwrite"]) == EXIT_OK
    assert sorted(p.name for p in model.iterdir()) == ["detector.json", "fit.json", "tensors.safetensors"]
    assert no_leftovers(tmp_path) and np.isfinite(json.loads((model / "fit.json").read_text())["n_train"])
