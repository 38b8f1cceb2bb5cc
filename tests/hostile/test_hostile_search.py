"""Hostile use of `search`: two at once, a killed search resumed, absurd limits. Each asserts the message and that
earlier results are still there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automl_ad.cli import main
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.errors import UsageError
from automl_ad.search.engine import run_search
from automl_ad.search.request import SearchRequest
from automl_ad.tracking.board import leaderboard
from automl_ad.tracking.lock import FileLock
from automl_ad.tracking.store import INTERRUPTED, Tracker, writer_lock_path
from automl_ad.workspace import work_dir_for

HOLD_LOCK = ("import sys, time\n"
             "from automl_ad.tracking.lock import FileLock\n"
             "assert FileLock(sys.argv[1]).try_acquire() is None\n"
             "print('held', flush=True)\n"
             "time.sleep(600)\n")


@pytest.fixture
def data(tmp_path) -> Path:
    return generate_demo(tmp_path / "data", categories=["texture"], n_train=20, n_test_good=6, n_test_per_defect=2,
                         size=64)["texture"]


@pytest.fixture
def hold(request):
    """Start a process that holds the lock file at a path (as a running search would); killed afterwards."""
    holders = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in holders:
        proc.kill()
        proc.wait()


def _earlier_search(uri: str) -> tuple[str, list[str]]:
    """A finished search already in the store: its parent run id and trial run ids."""
    tracker = Tracker(uri)
    experiment = tracker.experiment("earlier")
    parent = tracker.start_search(experiment, "earlier", {"budget_s": 60}, {}, [])
    runs = [tracker.log_trial(experiment, parent, {"trial_id": f"t{i}", "family": "gaussian", "status": "ok",
                                                   "quality": 0.5 + i / 10, "throughput": 10.0, "memory_mb": 100.0}, [])
            for i in range(2)]
    tracker.finish_search(parent)
    return parent, runs


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# --- one search at a time ---------------------------------------------------------------------------------------
def test_second_search_on_a_busy_store_is_refused_naming_the_holder(tmp_path, data, hold, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    parent, runs = _earlier_search(uri)
    holder = hold(writer_lock_path(uri))
    monkeypatch.chdir(tmp_path)
    code = main(["search", str(data), "--families", "gaussian", "--budget", "1m", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2
    assert f"another search is already writing to the tracking store {uri}" in err and f"pid {holder.pid}" in err
    assert "started" in err and "--tracking-uri" in err and "--resume" in err
    assert not (tmp_path / ".automl-ad" / "search").exists()  # refused before anything was prepared
    # readers do not wait for the writer: the earlier search is still there and readable meanwhile
    assert main(["leaderboard", "earlier", "--json", "--tracking-uri", uri]) == 0
    board = json.loads(capsys.readouterr().out)
    assert sorted(r["run_id"] for r in board) == sorted(runs)
    assert Tracker(uri).finished_trial_ids(parent) == {"t0", "t1"}


def test_second_search_in_a_busy_search_folder_is_refused(tmp_path, data, hold, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    work_dir = work_dir_for(open_dataset(data))
    work_dir.mkdir(parents=True)
    (work_dir / "searches").mkdir()
    earlier_state = work_dir / "searches" / "earlier.json"
    earlier_state.write_text('{"parent_run_id": "earlier"}')
    holder = hold(work_dir / "search.lock")
    other_store = tmp_path / "other" / "mlflow.db"
    code = main(["search", str(data), "--families", "gaussian", "--budget", "1m",
                 "--tracking-uri", f"sqlite:///{other_store}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"another search is already writing to the search folder {work_dir}" in err
    assert f"pid {holder.pid}" in err and "another working directory" in err
    assert earlier_state.read_text() == '{"parent_run_id": "earlier"}' and not other_store.exists()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, hold):
    path = tmp_path / "search.lock"
    holder = hold(path)
    assert FileLock(path).try_acquire()["pid"] == holder.pid  # held: the contender learns who holds it
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = FileLock(path)
    assert lock.try_acquire() is None  # the OS released the dead holder's lock
    assert lock.holder()["pid"] == os.getpid()
    assert FileLock(path).try_acquire()["pid"] == os.getpid()  # and it is exclusive, even within one process
    lock.release()
    path.write_text("{half written")  # what a holder killed while writing leaves
    lock = FileLock(path)
    assert lock.try_acquire() is None and lock.holder()["pid"] == os.getpid()
    lock.release()


CREATE_STORE = ("import sys, time, pathlib\n"
                "from automl_ad.tracking.store import Tracker\n"
                "print('ready', flush=True)\n"
                "while not pathlib.Path(sys.argv[2]).exists():\n"
                "    time.sleep(0.005)\n"
                "t = Tracker(sys.argv[1]); e = t.experiment(sys.argv[3])\n"
                "print(t.start_search(e, sys.argv[3], {}, {}, []), flush=True)\n")


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    """Without serialising creation, MLflow's schema migrations race (duplicate column / table already exists)."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    go = tmp_path / "go"
    names = [f"search-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_STORE, uri, str(go), name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in names]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()  # all start creating the store at the same moment
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "alembic" not in err and "Traceback" not in err
    tracker = Tracker(uri)
    for name, (out, _) in zip(names, outputs):
        parent = out.split()[-1]
        assert tracker.client.get_run(parent).info.run_name == name


# --- limits ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--max-trials", "0"], "--max-trials must be at least 1"),
    (["--max-trials=-3"], "--max-trials must be at least 1"),
    (["--budget", "1000000000h"], "--budget must be a positive, finite duration of at most 30 days"),
    (["--budget", "9" * 400 + "s"], "finite"),  # parses to inf
    (["--budget", "31d"], "at most 30 days"),
    (["--budget", "0s"], "positive"),
    (["--budget=-5m"], "not a duration"),
    (["--budget", "nan"], "not a duration"),
    (["--trial-timeout", "nan"], "--trial-timeout must be a positive, finite duration"),
    (["--trial-timeout=-1"], "--trial-timeout must be a positive, finite duration"),
    (["--trial-timeout", "1e300"], "--trial-timeout must be a positive, finite duration"),
])
def test_absurd_limits_are_usage_errors_that_touch_nothing(args, message, tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".automl-ad").mkdir()
    (tmp_path / ".automl-ad" / "keep.txt").write_text("earlier results")
    before = _files(tmp_path)
    code = main(["search", str(data), "--families", "gaussian", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("limits, message", [
    ({"budget_s": float("nan")}, "--budget must be a positive, finite duration"),
    ({"budget_s": float("inf")}, "--budget must be a positive, finite duration"),
    ({"budget_s": -1.0}, "--budget must be a positive, finite duration"),
    ({"budget_s": 3.6e12}, "at most 30 days"),
    ({"budget_s": None}, "--budget must be a positive"),  # only a resumed search keeps its own budget
    ({"trial_timeout_s": float("nan")}, "--trial-timeout"),
    ({"max_trials": 0}, "--max-trials must be at least 1"),
    ({"max_trials": 2.5}, "--max-trials must be at least 1"),
])
def test_library_search_refuses_absurd_limits(limits, message, tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=re.escape(message)):
        run_search(SearchRequest(data=str(data), families=["gaussian"], **limits))
    assert not (tmp_path / ".automl-ad").exists()


# --- resume ------------------------------------------------------------------------------------------------------
def test_resume_with_nothing_to_resume(tmp_path, data, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    parent, _ = _earlier_search(uri)
    monkeypatch.chdir(tmp_path)
    code = main(["search", str(data), "--families", "gaussian", "--resume", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2
    assert "nothing to resume: no earlier search of this dataset was started from this working directory" in err
    assert "without --resume" in err
    tracker = Tracker(uri)
    assert tracker.finished_trial_ids(parent) == {"t0", "t1"}
    assert sorted(e.name for e in tracker.client.search_experiments()) == ["Default", "earlier"]  # none created


@pytest.fixture
def local_ray():
    yield
    import ray

    ray.shutdown()


def test_resume_states_of_two_searches_are_kept_apart(tmp_path, data, monkeypatch, local_ray):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    first = run_search(SearchRequest(data=str(data), families=["gaussian"], budget_s=200, max_trials=1,
                                     tracking_uri=uri, trial_timeout_s=120))
    states = Path(first.work_dir) / "searches"
    first_state = (states / f"{first.parent_run_id}.json").read_text()
    second = run_search(SearchRequest(data=str(data), families=["gaussian"], budget_s=300, max_trials=1,
                                      tracking_uri=uri, trial_timeout_s=120))
    assert second.parent_run_id != first.parent_run_id
    assert (states / f"{first.parent_run_id}.json").read_text() == first_state  # not overwritten
    assert json.loads((states / f"{second.parent_run_id}.json").read_text())["budget_s"] == 300
    resumed = run_search(SearchRequest(data=str(data), families=["gaussian"], budget_s=None, max_trials=1,
                                       tracking_uri=uri, resume=True))
    assert resumed.parent_run_id == second.parent_run_id  # the newest search of this store
    assert (states / f"{first.parent_run_id}.json").read_text() == first_state
    tracker = Tracker(uri)
    assert len(tracker.finished_trial_ids(first.parent_run_id)) == 1
    assert len(tracker.finished_trial_ids(second.parent_run_id)) == 1
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    with pytest.raises(UsageError, match=f"nothing to resume in the tracking store {re.escape(other)}.*"
                                         f"recorded in {re.escape(uri)}"):
        run_search(SearchRequest(data=str(data), families=["gaussian"], budget_s=None, tracking_uri=other,
                                 resume=True))


# --- kill -9 mid-search, then --resume ------------------------------------------------------------------------
def _session_members(session: int) -> list[int]:
    """Live processes of a session (Ray's workers and the trial processes start their own process groups)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def _kill_session(proc: subprocess.Popen) -> None:
    """kill -9 the search's process group, then anything of its session still alive after a short grace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 30
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(condition, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _specs(work_dir: Path, parent: str) -> dict[str, dict]:
    found = {}
    for path in work_dir.glob("trials/*/spec.json"):
        try:
            spec = json.loads(path.read_text())
        except ValueError:
            continue
        if spec.get("search") == parent:
            found[path.parent.name] = spec
    return found


@pytest.mark.slow  # 75-105 s on a busy 2-core machine: two searches, each starting its own Ray
@pytest.mark.skipif(sys.platform != "linux", reason="finds the search's processes through /proc")
def test_search_killed_with_sigkill_resumes_without_losing_trials(tmp_path, data):
    cli = [sys.executable, "-m", "automl_ad.cli", "search", str(data), "--families", "gaussian,frequency"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    budget = 120
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cli + ["--budget", f"{budget}s"], cwd=tmp_path, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state_file = _wait_for(lambda: next((tmp_path / ".automl-ad" / "search").glob("*/searches/*.json"), None),
                               "the search to start")
        state = json.loads(state_file.read_text())
        parent, work_dir = state["parent_run_id"], state_file.parent.parent
        tracker = Tracker(state["tracking_uri"])
        _wait_for(lambda: tracker.trials(parent), "a finished trial")
        # a second search on the same store and folder is refused at once and names the running one
        second = subprocess.run(cli + ["--budget", "1m"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another search is already writing" in second.stderr and f"pid {first.pid}" in second.stderr
        # a reader is not blocked by the running search
        assert tracker.trials(parent)[0].info.run_id in {r["run_id"] for r in leaderboard(None, state["tracking_uri"])}
        # kill while a trial runs (started, not recorded) and after some spent time was saved
        _wait_for(lambda: set(_specs(work_dir, parent)) - {r.data.tags["trial"] for r in tracker.trials(parent)}
                  and json.loads(state_file.read_text())["elapsed_s"] > 0, "a running trial")
    finally:
        _kill_session(first)
        log.close()
    assert first.returncode == -signal.SIGKILL
    before = {r.data.tags["trial"]: (r.info.run_id, r.data.tags["status"]) for r in tracker.trials(parent)}
    lost = set(_specs(work_dir, parent)) - set(before)
    spent = json.loads(state_file.read_text())["elapsed_s"]
    assert before and lost and 0 < spent < budget

    # resume: the rest of the budget; one more trial than were finished, so it ends after rerunning a lost one
    resumed = subprocess.Popen(cli + ["--resume", "--max-trials", str(len(before) + 1)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = resumed.communicate(timeout=600)[0]
    finally:
        _kill_session(resumed)
    assert resumed.returncode == 0, out
    assert f"budget left {budget - spent:.0f} s" in out and "recorded as failed" in out

    runs = {r.data.tags["trial"]: r for r in Tracker(state["tracking_uri"]).trials(parent)}
    specs = _specs(work_dir, parent)
    reruns = {spec["rerun_of"]: trial_id for trial_id, spec in specs.items() if spec.get("rerun_of")}
    for trial_id, (run_id, status) in before.items():  # finished trials are kept as they were, not run again
        assert runs[trial_id].info.run_id == run_id and runs[trial_id].data.tags["status"] == status
        assert trial_id not in reruns
    for trial_id in lost:  # the interrupted trials are recorded as such
        run = runs[trial_id]
        assert run.data.tags["failure_reason"] == INTERRUPTED and run.data.tags["status"] == "failed"
        assert run.info.status == "FAILED"
    rerun_of = min(lost, key=lambda t: (work_dir / "trials" / t / "spec.json").stat().st_mtime)
    again = runs[reruns[rerun_of]]  # the oldest interrupted trial ran again with the same configuration
    assert specs[reruns[rerun_of]]["params"] == specs[rerun_of]["params"]
    assert again.data.tags.get("failure_reason") != INTERRUPTED
    if specs[rerun_of]["default"]:  # a lost default (warm start) runs again as the default
        assert again.data.tags["default_config"] == "True" and again.data.tags["status"] == "ok"
    final = json.loads(state_file.read_text())
    assert spent <= final["elapsed_s"] <= budget + 30 and final["finished"]
    assert not _session_members(first.pid) and not _session_members(resumed.pid)
