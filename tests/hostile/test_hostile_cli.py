"""Careless and hostile command lines: every case ends in a clear ``error: ...`` (or argparse's usage error) with
the documented exit code, never a traceback; ``automl-ad ui`` stops its MLflow server when it is stopped."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import noise_image, run_cli, write_image

from automl_ad.cli import EXIT_DATA, EXIT_OK, EXIT_USAGE, main


def mvtec(root: Path, n_train: int, with_test: bool = True) -> Path:
    for i in range(n_train):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    if with_test:
        for i in range(2):
            write_image(root / "test" / "good" / f"{i:03d}.png", noise_image(100 + i))
            write_image(root / "test" / "crack" / f"{i:03d}.png", noise_image(200 + i))
    return root


def flat(root: Path, n: int) -> Path:
    for i in range(n):
        write_image(root / f"{i:03d}.png", noise_image(i))
    return root


# --- fit --------------------------------------------------------------------------------------------------------

def test_fit_parameter_out_of_range_names_family_parameter_and_range(mvtec_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", mvtec_dir, "--family", "patchcore", "--param", "coreset_ratio=-1",
                        "--out", tmp_path / "m")
    assert code == EXIT_USAGE
    assert err.startswith("error: ") and "patchcore" in err and "coreset_ratio" in err and "-1" in err
    assert "(0, 1]" in err
    assert not (tmp_path / "m").exists()


def test_fit_failure_caused_by_user_parameters_is_a_usage_error_with_its_cause(mvtec_dir, tmp_path, capsys, caplog,
                                                                                monkeypatch):
    from automl_ad.detectors.registry import detector_class

    def broken_fit(self, train, on_epoch=None):
        raise ValueError("smoothing kernel larger than the image")

    monkeypatch.setattr(detector_class("gaussian"), "_fit", broken_fit)
    with caplog.at_level(logging.INFO, logger="automl_ad"):
        code, _, err = run_cli(capsys, "--verbose", "fit", mvtec_dir, "--family", "gaussian", "--param",
                            "smoothing_sigma=3.0", "--out", tmp_path / "m")
    assert code == EXIT_USAGE
    assert "gaussian failed with your parameters (smoothing_sigma=3.0)" in err
    assert "smoothing kernel larger than the image" in err and "--verbose" in err
    chained = [r for r in caplog.records if r.exc_info]
    assert chained and "smoothing kernel" in str(chained[0].exc_info[1])  # the original, kept for --verbose


def test_fit_failure_without_user_parameters_is_not_disguised(mvtec_dir, tmp_path, monkeypatch):
    from automl_ad.detectors.registry import detector_class

    def broken_fit(self, train, on_epoch=None):
        raise ValueError("a genuine bug")

    monkeypatch.setattr(detector_class("gaussian"), "_fit", broken_fit)
    with pytest.raises(ValueError, match="a genuine bug"):
        main(["fit", str(mvtec_dir), "--family", "gaussian", "--out", str(tmp_path / "m")])


@pytest.mark.parametrize("layout", ["mvtec", "flat"])
def test_fit_refuses_a_single_training_image(layout, tmp_path, capsys):
    data = mvtec(tmp_path / "one", 1) if layout == "mvtec" else flat(tmp_path / "one", 1)
    code, _, err = run_cli(capsys, "fit", data, "--family", "gaussian", "--out", tmp_path / "m")
    assert code == EXIT_DATA
    assert "1 normal image(s) to fit on" in err and "at least 2" in err
    assert str(data / "train" / "good" if layout == "mvtec" else data) in err  # where to add images
    assert not (tmp_path / "m").exists()


def test_fit_missing_dataset_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", tmp_path / "nowhere", "--family", "gaussian", "--out", tmp_path / "m")
    assert code == EXIT_DATA and "nowhere does not exist" in err


def test_fit_dataset_path_that_is_a_file(tmp_path, capsys):
    image = write_image(tmp_path / "one.png", noise_image(0))
    code, _, err = run_cli(capsys, "fit", image, "--family", "gaussian", "--out", tmp_path / "m")
    assert code == EXIT_DATA and "is a file, not a folder" in err


def test_fit_unknown_family_suggests_the_closest(mvtec_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", mvtec_dir, "--family", "padm", "--out", tmp_path / "m")
    assert code == EXIT_USAGE and "no detector family 'padm'" in err and "Did you mean 'padim'" in err


def test_fit_missing_weights_file_is_refused_before_fitting(mvtec_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", mvtec_dir, "--family", "padim", "--weights", tmp_path / "nope.safetensors",
                        "--out", tmp_path / "m")
    assert code == EXIT_USAGE and "nope.safetensors is not a file" in err


# --- evaluate ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mvtec", "plain", "flat"])
def test_evaluate_on_data_without_test_images(layout, tmp_path, capsys):
    data = {"mvtec": lambda: mvtec(tmp_path / "d", 4, with_test=False),
            "plain": lambda: flat(tmp_path / "d" / "good", 2).parent, "flat": lambda: flat(tmp_path / "d", 2)}[layout]()
    model = tmp_path / "m"
    assert run_cli(capsys, "fit", data, "--family", "gaussian", "--param", "input_size=32", "--out", model)[0] \
        == EXIT_OK
    code, _, err = run_cli(capsys, "evaluate", model, data)
    assert code == EXIT_DATA and f"{data} has no test images" in err
    if layout == "mvtec":
        assert str(data / "test" / "good") in err and f"{data / 'test'}/<defect_type>/" in err
    elif layout == "plain":
        assert f"{data}/<defect_type>/" in err and "add a folder of defective images" in err
    else:
        assert "flat folder" in err and "test/good/" in err
    assert not (model / "evaluation").exists()


def test_evaluate_on_normal_test_images_only_explains_the_missing_metrics(tmp_path, capsys):
    data = mvtec(tmp_path / "d", 4, with_test=False)
    for i in range(2):
        write_image(data / "test" / "good" / f"{i}.png", noise_image(50 + i))
    model = tmp_path / "m"
    assert run_cli(capsys, "fit", data, "--family", "gaussian", "--param", "input_size=32", "--out", model)[0] \
        == EXIT_OK
    assert main(["evaluate", str(model), str(data), "--no-cost"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "every test image is normal, so the detection metrics are n/a; add defective test images" in out


def test_evaluate_a_folder_that_is_not_a_model(mvtec_dir, tmp_path, capsys):
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "manifest.json").write_text("{}")
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "package", mvtec_dir)
    assert code == EXIT_USAGE and "not a model folder written by `automl-ad fit`" in err
    assert "automl-ad predict" in err


def test_evaluate_out_that_is_a_file(tmp_path, mvtec_dir, capsys):
    model = tmp_path / "m"
    assert run_cli(capsys, "fit", mvtec_dir, "--family", "gaussian", "--param", "input_size=32", "--out", model)[0] \
        == EXIT_OK
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "evaluate", model, mvtec_dir, "--out", tmp_path / "notes.txt")
    assert code == EXIT_USAGE and "notes.txt is an existing file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- argument values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536", "http"])
def test_ui_port_outside_1_to_65535(port, capsys):
    code, _, err = run_cli(capsys, "ui", "--port", port)
    assert code == EXIT_USAGE and "argument --port" in err and "1-65535" in err


@pytest.mark.parametrize("argv", [["recommend", "data", "--top", "0"], ["demo", "--top", "-2"],
                                  ["report", "--max-images", "0"]])
def test_counts_below_one(argv, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE and "must be at least 1" in err


@pytest.mark.parametrize("rate", ["0", "1", "5", "-0.1", "nan", "lots"])
def test_false_alarm_rate_outside_0_1(rate, capsys):
    for argv in (["export", "--best", "pkg", "--false-alarm-rate", rate], ["report", "--false-alarm-rate", rate]):
        code, _, err = run_cli(capsys, *argv)
        assert code == EXIT_USAGE and "argument --false-alarm-rate" in err


def test_demo_negative_seed(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--seed", "-1", "--budget", "0", "--out", tmp_path / "demo")
    assert code == EXIT_USAGE and "argument --seed: must be 0 or more" in err
    assert not (tmp_path / "demo").exists()


# --- tracking store ---------------------------------------------------------------------------------------------

def test_leaderboard_on_an_empty_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "leaderboard")
    assert code == EXIT_USAGE and "no search in" in err and "automl-ad search" in err


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("uri, message", [
    ("garbage", "is a folder (MLflow's file store"),
    ("foo://bar", "unknown scheme 'foo'"),
    ("http://127.0.0.1:{port}", "cannot reach the MLflow server"),
    ("http://127.0.0.1:99999", "cannot reach the MLflow server"),
])
@pytest.mark.parametrize("command", [["leaderboard"], ["report"], ["export", "--best", "pkg"], ["ui"]])
def test_tracking_uri_garbage(command, uri, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, err = run_cli(capsys, *command, "--tracking-uri", uri.format(port=_closed_port()))
    assert code == EXIT_USAGE and message in err
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "garbage").exists()


def test_ui_refuses_a_server_uri(tmp_path, monkeypatch, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        code, _, err = run_cli(capsys, "ui", "--tracking-uri", f"http://127.0.0.1:{server.getsockname()[1]}")
    assert code == EXIT_USAGE and "with its own UI" in err


def test_ui_port_in_use(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(capsys, "ui", "--port", taken.getsockname()[1])
    assert code == EXIT_USAGE and "already in use" in err and "--port" in err


# --- other commands ---------------------------------------------------------------------------------------------

def test_predict_with_a_folder_that_is_not_a_package(mvtec_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", mvtec_dir, mvtec_dir / "test", "--out", tmp_path / "p")
    assert code != EXIT_OK and err.startswith("error: ") and "manifest.json" in err
    assert not (tmp_path / "p").exists()


def test_report_out_into_a_missing_folder_or_onto_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "report", "--out", tmp_path / "new" / "deeper" / "report.html")
    assert code == EXIT_USAGE and "no search in" in err  # a missing folder is fine: it would be created
    assert not (tmp_path / "new").exists()  # ... but not before there is a report to write
    code, _, err = run_cli(capsys, "report", "--out", tmp_path)
    assert code == EXIT_USAGE and "is a folder; give the path of the file to write" in err
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli(capsys, "report", "--out", tmp_path / "file" / "report.html")
    assert code == EXIT_USAGE and "is a file, not a folder" in err


def test_profile_out_below_a_file(mvtec_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli(capsys, "profile", mvtec_dir, "--out", tmp_path / "file" / "p.json")
    assert code == EXIT_USAGE and "is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "mine"


# --- ui: a real server, stopped by SIGTERM ------------------------------------------------------------------------

def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, read from /proc."""
    rows = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        rows.append((int(entry.name), fields[0], int(fields[1]), int(fields[2])))
    return rows


def _descendants(root: int) -> set[int]:
    """Pids of every living descendant of process ``root``."""
    children: dict[int, list[int]] = {}
    for pid, _, parent, _ in _processes():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (IPv6 ones as their /proc hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads processes and sockets from Linux /proc")
def test_ui_stops_the_mlflow_server_on_sigterm(tmp_path):
    port = _closed_port()
    log_file = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen([sys.executable, "-m", "automl_ad.cli", "ui", "--port", str(port)], cwd=tmp_path,
                          stdout=log_file, stderr=subprocess.STDOUT)
    server, leftovers = set(), []
    try:
        deadline = time.monotonic() + 180  # a hang guard: the MLflow UI takes 10-40 s to start
        while not _answers(port):
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()
            assert time.monotonic() < deadline, "the MLflow UI did not answer"
            time.sleep(0.5)
        server = _descendants(ui.pid)
        leader = [pid for pid, _, parent, _ in _processes() if parent == ui.pid]
        assert len(leader) == 1
        assert {pgid for pid, _, _, pgid in _processes() if pid in server} == set(leader)  # its own process group
        assert _listening_addresses(port) == {"127.0.0.1"}  # this machine only
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        server |= _descendants(ui.pid)
        leftovers = [pid for pid, state, _, pgid in _processes() if (pid in server or pgid in server) and state != "Z"]
        for pid in leftovers:  # clean up after a failure
            os.kill(pid, signal.SIGKILL)
        log_file.close()
    output = (tmp_path / "ui.log").read_text()
    assert "MLflow UI stopped." in output and "Traceback" not in output
    assert not leftovers, "processes of the MLflow server survived"
    assert not _answers(port) and not _listening_addresses(port)
