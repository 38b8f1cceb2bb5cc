"""A failed trial's reason is its own error: the exception the trial process reports, or, for a process that ended
without reporting one, the last Python error in its stderr or how it was killed — never a warning it printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automl_ad.search.ray_runtime import TrialFailed, _parent_gone, run_trial_process
from automl_ad.search.trial import last_python_error, unreported_failure

WARNING = "Unexpected keys (classifier.bias, classifier.weight) found while loading pretrained weights."
TRACEBACK = ("Traceback (most recent call last):\n"
             '  File "trial.py", line 3, in fit\n'
             "    raise KeyError('first')\n"
             "KeyError: 'first'\n"
             "\n"
             "During handling of the above exception, another exception occurred:\n"
             "\n"
             "Traceback (most recent call last):\n"
             '  File "trial.py", line 9, in fit\n'
             "    raise ValueError(\n"
             "ValueError: input_size must be positive\n"
             "  with a second line\n")


def test_last_python_error_is_the_final_exception_line():
    assert last_python_error(f"{WARNING}\n{TRACEBACK}{WARNING}\n") == "ValueError: input_size must be positive"
    assert last_python_error(f"{WARNING}\nFatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most "
                             "recent call first):\n  File \"x.py\", line 1\n") \
        == "Fatal Python error: Segmentation fault"
    assert last_python_error(f"{WARNING}\n") is None


def test_unreported_failure_names_the_kill_not_a_warning():
    killed = unreported_failure(-9, f"{WARNING}\n")
    assert killed == {"event": "failed", "reason": "killed (out of memory?)",
                      "error": "killed by SIGKILL, without a Python error"}
    crashed = unreported_failure(1, f"{TRACEBACK}{WARNING}\n")
    assert crashed["reason"] == "crashed" and crashed["error"] == "exit code 1: ValueError: input_size must be positive"
    timeout = unreported_failure(-9, f"{WARNING}\n", time_limit_s=84)
    assert timeout["reason"] == "timeout" and timeout["error"] == "killed by SIGKILL after the hard time limit of 84 s"


def _run(tmp_path, data_file: str) -> dict:
    config = {"trial_id": "t1", "family": "gaussian", "params": {}}
    with pytest.raises(TrialFailed) as failed:
        run_trial_process(config, str(tmp_path / "work"), data_file, "combined", 60, 1, str(tmp_path / "cache"),
                          report=lambda _: None)
    details = json.loads((tmp_path / "work" / "trials" / "t1" / "failure.json").read_text())
    assert f"{details['reason']}: {details['error']}" in str(failed.value)
    return details


def test_trial_process_reports_its_own_exception(tmp_path):
    details = _run(tmp_path, str(tmp_path / "missing.json"))
    assert details["reason"] == "FileNotFoundError"
    assert details["error"].startswith("FileNotFoundError: ") and "missing.json" in details["error"]


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in trial process is a POSIX shell script")
@pytest.mark.parametrize("ending, reason, error", [
    ("kill -9 $$", "killed (out of memory?)", "killed by SIGKILL, without a Python error"),
    (f"exec {sys.executable} -c \"raise RuntimeError('no weights for mobilenet')\"", "crashed",
     "exit code 1: RuntimeError: no weights for mobilenet"),
])
def test_trial_process_ending_without_a_report(tmp_path, monkeypatch, ending, reason, error):
    """A process that prints a library warning and then dies is described by how it died, not by the warning."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!/bin/sh\necho '{WARNING}' >&2\n{ending}\n")
    stand_in.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    details = _run(tmp_path, str(tmp_path / "data.json"))
    assert details["reason"] == reason
    assert details["error"].startswith(error) and "stderr.log" in details["error"]
    assert "Unexpected keys" not in details["error"]


RAY_FAILURES = '''
import json, sys
from pathlib import Path
from types import SimpleNamespace
from ray import cloudpickle
from ray.exceptions import ActorDiedError, RayTaskError
from automl_ad.search.progress import SearchCallback

work = Path(sys.argv[1])
callback = object.__new__(SearchCallback)  # only the failure reading is exercised, no tracker
callback.work_dir = work
out = {}
for name, error in (("lost", ActorDiedError()),
                    ("raised", RayTaskError("train", "Traceback ...", ValueError("no node.json"), "proc", 1, "ip")),
                    ("none", None)):
    trial_dir = work / "trials" / name
    trial_dir.mkdir(parents=True)
    (trial_dir / "node.json").write_text(json.dumps({"node_id": "abc123", "host": "box"}))
    pickled = trial_dir / "error.pkl"
    if error is not None:
        pickled.write_bytes(cloudpickle.dumps(error))
    trial = SimpleNamespace(trial_id=name, pickled_error_file=str(pickled), error_file=str(trial_dir / "error.txt"))
    out[name] = callback._ray_failure(trial)
print(json.dumps(out))
'''


def test_trial_ended_by_ray_gets_its_reason(tmp_path):
    """Tune's own errors: a lost worker names the node; an exception in the trainable is itself (run in a fresh
    process: importing ray here would put it in cluster mode before a local search of this session starts it)."""
    result = subprocess.run([sys.executable, "-c", RAY_FAILURES, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.splitlines()[-1])
    assert failures["lost"]["reason"] == "worker lost"
    assert "node abc123 on box" in failures["lost"]["error"] and "ActorDiedError" in failures["lost"]["error"]
    assert failures["raised"] == {"reason": "ValueError", "error": "ValueError: no node.json"}
    assert failures["none"] == {"reason": "error", "error": "Ray recorded no error for this trial"}


def test_a_worker_sees_its_node_going_down_by_its_parent_ending(tmp_path):
    """A trial SIGKILLed with its whole node is a lost worker: the worker's parent (the raylet) ends within the grace
    period; a trial killed alone (the kernel's OOM killer) leaves the parent alive."""
    assert not _parent_gone(os.getppid(), grace_s=0.2)
    orphan = (f"import os, sys; sys.path.insert(0, {str(Path.cwd())!r}); "
              "from automl_ad.search.ray_runtime import _parent_gone; parent = int(sys.argv[1]); "
              f"open({str(tmp_path / 'seen')!r}, 'w').write(str(_parent_gone(parent, grace_s=20)))")
    subprocess.run(["sh", "-c", f"{sys.executable} -c \"{orphan}\" $$ & sleep 1"], check=True, timeout=60)
    deadline = time.monotonic() + 30
    while not (tmp_path / "seen").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    assert (tmp_path / "seen").read_text() == "True"


def test_the_live_view_shows_a_skip_reason_whole_and_shortens_a_long_error_at_a_word():
    from automl_ad.search.progress import trial_line

    skip = ("predicted 271 s (cost model × measured machine speed 9.7 (fit), 0.5 (evaluation)) even with 8 training "
            "images (1/3), 1/100 epochs, over the 8 s it may have")
    record = {"status": "failed", "family": "fastflow", "trial_id": "3fe52982", "params": {},
              "reason": "predicted too slow", "error": skip}
    assert trial_line(record).endswith(f"predicted too slow: {skip}")
    long = trial_line({**record, "reason": "RuntimeError", "error": "RuntimeError: " + "word " * 100})
    assert long.endswith("word … (the whole reason: in MLflow)") and len(long) < 300 + 60


def test_a_skipped_configuration_is_recorded_as_not_started_and_a_proposer_error_as_failed(tmp_path):
    """A configuration predicted too slow never ran: the live view, the record and MLflow say "not started", not
    "failed"; the proposer's own error stays a failure."""
    from types import SimpleNamespace

    from automl_ad.search.progress import SearchCallback, trial_line
    from automl_ad.search.ray_runtime import skip_record
    from automl_ad.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("skips")
    parent = tracker.start_search(experiment, "s", {}, {}, [])
    request = SimpleNamespace(routes={}, artifact_cap_mb=100, cache_cap_mb=10_000)
    callback = SearchCallback(tracker, experiment, parent, request, tmp_path, budget_s=60)
    for trial_id, reason in (("t0", "predicted too slow"), ("t1", "internal error")):
        config = {"family": "padim", "params": {}, "skip": "it cannot finish in the 8 s left", "skip_reason": reason}
        (tmp_path / "trials" / trial_id).mkdir(parents=True)
        (tmp_path / "trials" / trial_id / "failure.json").write_text(json.dumps(skip_record(config)))
        callback.on_trial_error(0, [], SimpleNamespace(trial_id=trial_id, config=config))
    skipped, failed = callback.records
    assert skipped["status"] == "not started" and failed["status"] == "failed"
    assert trial_line(skipped).startswith("– padim") and trial_line(skipped).endswith(
        "predicted too slow: it cannot finish in the 8 s left")
    assert trial_line(failed).startswith("✗ padim")
    runs = {r.data.tags["trial"]: r for r in tracker.trials(parent)}
    assert runs["t0"].data.tags["status"] == "not started" and runs["t0"].info.status == "KILLED"
    assert runs["t1"].data.tags["status"] == "failed" and runs["t1"].info.status == "FAILED"


def test_saved_models_leave_the_disk_its_reserve(tmp_path, monkeypatch):
    """Dominated trials' models go, oldest first, when the disk's free space falls below the reserve, even under
    the artifact cap; the Pareto front's models stay."""
    from types import SimpleNamespace

    from automl_ad import folders
    from automl_ad.defaults import DISK_RESERVE_MB
    from automl_ad.search.progress import trim_disk

    for i, trial in enumerate(("old", "front", "new")):
        model = tmp_path / "trials" / trial / "model"
        model.mkdir(parents=True)
        (model / "weights.bin").write_bytes(bytes(2**20))
        os.utime(model, (1_000 + i, 1_000 + i))
    usage = SimpleNamespace(total=10_000 * 2**20, free=(DISK_RESERVE_MB - 1.5) * 2**20)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage)
    trim_disk(tmp_path, keep={"front"}, cap_mb=5_000)
    assert sorted(p.parent.name for p in (tmp_path / "trials").glob("*/model")) == ["front"]
