"""What lets a stopped or killed search go on with ``--resume``: its state file (budget, time spent, saved as it
runs), the trials it lost, and the Optuna trials it left running."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from automl_ad.defaults import (
    SEARCH_CHECKPOINT_EVERY_S,
)
from automl_ad.errors import UsageError
from automl_ad.folders import write_json_atomically
from automl_ad.search.request import SearchRequest
from automl_ad.tracking.store import INTERRUPTED


def state_path(work_dir: Path, parent: str) -> Path:
    """Resume state of one search: its parent run, Optuna study, budget and time spent."""
    return work_dir / "searches" / f"{parent}.json"


def resume_state(work_dir: Path, request: SearchRequest, uri: str) -> dict:
    """State of the newest search of this dataset started from this working directory into store ``uri``."""
    states = []
    for path in sorted((work_dir / "searches").glob("*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the resume state {path}: {exc}. Delete it to resume an older search, or "
                             "start a new search without --resume") from None
    if not states:
        raise UsageError(f"nothing to resume: no earlier search of this dataset was started from this working "
                         f"directory (no resume state under {work_dir / 'searches'}); run without --resume")
    here = [s for s in states if s.get("tracking_uri") == uri]
    if not here:
        stores = ", ".join(sorted({str(s.get("tracking_uri")) for s in states}))
        raise UsageError(f"nothing to resume in the tracking store {uri}: the earlier searches of this dataset from "
                         f"this working directory were recorded in {stores}; pass that with --tracking-uri")
    state = max(here, key=lambda s: s.get("created", 0.0))
    if request.budget_s and request.budget_s > state["budget_s"]:
        state["budget_s"] = request.budget_s
    return state


def interrupted_trials(work_dir: Path, parent: str, tracker, experiment_id: str, routes: dict) -> list[dict]:
    """Trials of search ``parent`` that a killed search process lost, to run again (their specs, oldest first).

    A trial that started (its spec is in the work folder) but has no MLflow run was running when the process died:
    it is recorded now as failed with reason ``INTERRUPTED``. Interrupted trials not yet run again are returned.
    """
    specs = {}
    for path in sorted((work_dir / "trials").glob("*/spec.json"), key=lambda p: p.stat().st_mtime):
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # cut short by the kill while being written: that trial had not started
        if spec.get("search") == parent:
            specs[path.parent.name] = spec
    recorded = {r.data.tags.get("trial"): r.data.tags.get("failure_reason") for r in tracker.trials(parent)}
    for trial_id, spec in specs.items():
        if trial_id not in recorded:
            tracker.log_trial(experiment_id, parent, {
                "trial_id": trial_id, "family": spec["family"], "params": spec["params"], "default": spec["default"],
                "route": routes.get(spec["family"], ""), "status": "failed", "reason": INTERRUPTED,
                "error": "the search process ended while this trial was running; `--resume` runs it again"}, [])
            recorded[trial_id] = INTERRUPTED
    run_again = {spec.get("rerun_of") for spec in specs.values()}
    return [{**spec, "trial_id": trial_id} for trial_id, spec in specs.items()
            if recorded[trial_id] == INTERRUPTED and trial_id not in run_again]


class ElapsedCheckpoint:
    """Saves a running search's state with the time spent so far, every ``SEARCH_CHECKPOINT_EVERY_S`` and at stop."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self._spent_before, self._started = state["elapsed_s"], time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(SEARCH_CHECKPOINT_EVERY_S):
            self.save()

    def save(self) -> None:
        self.state["elapsed_s"] = self._spent_before + time.monotonic() - self._started
        write_json_atomically(self.path, self.state)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.save()


def fail_stale_trials(storage, study_name: str) -> None:
    """Trials left RUNNING by a killed search are marked FAIL (so the sampler does not wait for them) and
    ``interrupted`` (so they count neither as a family's failure nor as its default having run)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
