"""Searches and trials read back from the tracking store as typed records: the one reader that export, report,
leaderboard and serving use, so no other package handles MLflow runs or their string tags. Everything a
search needs later (its data split, the saved trial models) is read from the store, so it works from any
working directory given the tracking URI."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.data.geometry import geometry_label
from automl_ad.data.split import SearchSplit
from automl_ad.errors import UsageError
from automl_ad.evaluation.objectives import OBJECTIVE_METRICS
from automl_ad.tracking.store import Tracker
from automl_ad.workspace import dataset_experiment

#: Artifact of the search run holding the data split its trials used (paths, labels, masks).
SPLIT_ARTIFACT = "search/split.json"


@dataclass(frozen=True)
class SearchRecord:
    """A search (the parent run): where its data came from and how it was split and ranked."""

    run_id: str
    experiment: str
    data: str
    seed: int
    metric: str
    validation_kind: str
    families: list[str]
    work_dir: str | None
    fingerprint: str
    dataset_name: str
    start_time: int  # ms since the epoch
    params: dict = field(repr=False)
    #: False while its run is open: the search is running, or its process was killed before it ended.
    ended: bool = True

    @property
    def limits(self) -> dict[str, float]:
        """The deployment limits of the search's constraint profile (``latency_ms``, ``model_mb``; may be empty)."""
        return _value(self.params.get("limits", "{}")) or {}


@dataclass(frozen=True)
class TrialRecord:
    """One trial (a child run): family, parameters, outcome, metrics and its place on the Pareto front."""

    run_id: str
    search_id: str
    trial: str
    family: str
    route: str
    status: str
    default_config: bool
    pareto_rank: int | None
    params: dict
    metrics: dict[str, float]
    failure_reason: str | None = None
    error: str | None = None
    node: str | None = None

    @property
    def quality(self) -> float | None:
        return self.metrics.get("quality")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def on_front(self) -> bool:
        return self.pareto_rank == 0

    @property
    def complete(self) -> bool:
        """Finished with every objective measured (it can be ranked)."""
        return self.ok and all(m in self.metrics for m in OBJECTIVE_METRICS)

    @property
    def geometry(self) -> dict:
        """How the trial's model sees an image: the network input size and the parameters that shape it."""
        return {k: v for k, v in self.params.items() if k in ("input_size", "geometry", "tile", "gray")}

    def row(self) -> dict:
        """A flat dictionary for tables and JSON output."""
        return {"run_id": self.run_id, "search_id": self.search_id, "trial": self.trial, "family": self.family,
                "route": self.route, "status": self.status, "default_config": self.default_config,
                "pareto_rank": self.pareto_rank, "failure_reason": self.failure_reason, "error": self.error,
                "node": self.node, "params": self.params, "input": geometry_label(self.params), **self.metrics}


def _value(text: str):
    """A logged parameter back as a value: JSON where it parses (lists, numbers), booleans and None, else text."""
    special = {"True": True, "False": False, "None": None}
    if text in special:
        return special[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


class SearchStore:
    """Read-only access to the searches in one tracking store."""

    def __init__(self, tracking_uri: str | None = None, tracker: Tracker | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar for each small download
        self.tracker = tracker or Tracker(tracking_uri)
        self.uri = self.tracker.uri

    # --- searches ---------------------------------------------------------------------------------------------
    def resolve(self, target: str | None = None) -> SearchRecord:
        """The search meant by ``target``: a search run id (a trial's id gives its search), an experiment name or
        id, a dataset folder (its newest search), or None for the newest
        search in the store."""
        client = self.tracker.client
        if target is None:
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, filter_string="tags.`automl_ad.kind` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
            if not runs:
                raise UsageError(f"no search in {self.uri}; run `automl-ad search` first")
            return self.search(runs[0].info.run_id)
        if len(target) == 32 and all(c in "0123456789abcdef" for c in target.lower()):
            kind = self._kind(target)
            if kind == "search":
                return self.search(target)
            if kind == "trial":
                return self.search(self.trial(target).search_id)
            if kind is not None:
                raise UsageError(f"run {target} is neither a search nor a search trial")
        if Path(target).is_dir():
            return self.search(self.tracker.latest_search(dataset_experiment(target)))
        return self.search(self.tracker.latest_search(target))

    def _kind(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.tracker.client.get_run(run_id).data.tags.get("automl_ad.kind", "")
        except MlflowException:
            return None

    def _run(self, run_id: str, kind: str):
        """The MLflow run ``run_id``, which must be of ``kind`` ("search" or "trial")."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.tracker.client.get_run(run_id)
        except MlflowException as exc:
            raise UsageError(f"no run {run_id} in {self.uri}") from exc
        if run.data.tags.get("automl_ad.kind") != kind:
            raise UsageError(f"run {run_id} is not a {'search trial' if kind == 'trial' else kind}")
        return run

    def search(self, run_id: str) -> SearchRecord:
        run = self._run(run_id, "search")
        params = run.data.params
        return SearchRecord(run_id=run_id, experiment=self.tracker.client.get_experiment(run.info.experiment_id).name,
                            data=params.get("data", ""), seed=int(params.get("seed", 0)),
                            metric=params.get("metric", "combined"), validation_kind=params.get("validation", ""),
                            families=_value(params.get("families", "[]")), work_dir=params.get("work_dir"),
                            fingerprint=run.data.tags.get("fingerprint", ""),
                            dataset_name=run.data.tags.get("dataset", ""), start_time=run.info.start_time,
                            params=dict(params), ended=run.info.status != "RUNNING")

    def split(self, search: SearchRecord) -> SearchSplit:
        """The data split the search's trials used, as logged with the search."""
        data = self.artifact_json(search.run_id, SPLIT_ARTIFACT)
        if data is None:
            raise UsageError(f"search {search.run_id} has no logged data split ({SPLIT_ARTIFACT}); it was made by an "
                             "older automl-ad: run the search again")
        return SearchSplit.from_json(data)

    # --- trials -----------------------------------------------------------------------------------------------
    def trials(self, search_id: str) -> list[TrialRecord]:
        """Every trial of the search, best validation quality first (failed ones last)."""
        records = [self._record(run) for run in self.tracker.trials(search_id)]
        return sorted(records, key=lambda t: (not t.ok, -(t.quality or 0.0)))

    def front(self, search_id: str) -> list[TrialRecord]:
        """The complete trials on the search's Pareto front."""
        return [t for t in self.trials(search_id) if t.complete and t.on_front]

    def trial(self, run_id: str) -> TrialRecord:
        return self._record(self._run(run_id, "trial"))

    @staticmethod
    def _record(run) -> TrialRecord:
        tags = run.data.tags
        rank = tags.get("pareto_rank")
        return TrialRecord(
            run_id=run.info.run_id, search_id=tags.get("automl_ad.search", ""), trial=tags.get("trial", ""),
            family=tags.get("family", ""), route=tags.get("route", ""), status=tags.get("status", ""),
            default_config=tags.get("default_config") == "True",
            pareto_rank=int(rank) if rank not in (None, "") else None,
            params={k: _value(v) for k, v in run.data.params.items() if k != "family"},
            metrics=dict(run.data.metrics), failure_reason=tags.get("failure_reason"), error=tags.get("error"),
            node=tags.get("node_id"))

    def model_dir(self, trial: TrialRecord, tmp: Path, work_dir: str | None = None) -> Path:
        """The trial's saved model: logged in the store (front members), else still in the search's working
        folder; a UsageError when it was not kept."""
        client = self.tracker.client
        if any(a.path == "model" for a in client.list_artifacts(trial.run_id)):
            return Path(client.download_artifacts(trial.run_id, "model", str(tmp)))
        local = Path(work_dir) / "trials" / trial.trial / "model" if work_dir else None
        if local is not None and local.is_dir():
            return local
        raise UsageError(f"the model of run {trial.run_id} was not kept (only Pareto-front models are logged; "
                         "dominated ones are evicted to respect the disk cap). Export a front member: "
                         "automl-ad leaderboard --pareto")

    def artifact_file(self, run_id: str, path: str, destination: str | Path) -> Path:
        """Download one artifact of a run into ``destination``; returns its local path."""
        return Path(self.tracker.client.download_artifacts(run_id, path, str(destination)))

    def artifact_json(self, run_id: str, path: str) -> dict | None:
        """A JSON artifact of a run, or None when it was not logged."""
        client = self.tracker.client
        if path not in {a.path for a in client.list_artifacts(run_id, str(Path(path).parent))}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
