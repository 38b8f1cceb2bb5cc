"""MLflow tracking of searches: one experiment per dataset, a parent run per search, a child run per trial.

This is the only module that imports mlflow. The default store is an embedded SQLite database in the working
directory (``.automl-ad/mlflow.db``, artifacts beside it); any MLflow tracking URI (a server) works too.
A local store has one writing search at a time (:func:`writer_lock_path`; the search takes that lock), while
readers (leaderboard, export, report, ui) may read meanwhile, so writes are retried briefly when SQLite is busy.
Creating a new SQLite store is serialised by a file lock beside it, so processes starting at once do not race
through MLflow's schema migrations.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from automl_ad.defaults import STATE_DIR
from automl_ad.errors import UsageError
from automl_ad.evaluation.objectives import OBJECTIVES, pareto_ranks
from automl_ad.figures.plots import pareto_plot
from automl_ad.tracking.lock import FileLock

log = logging.getLogger(__name__)

TRIAL_METRICS = ("quality", "real_quality", "throughput", "memory_mb", "fit_seconds", "fit_extra_seconds",
                 "post_fit_seconds", "latency_ms_p50", "latency_ms_p95", "throughput_ips", "peak_rss_mb_fit",
                 "peak_rss_mb_score", "model_mb", "epochs_trained", "training_cut_by_time", "wall_seconds",
                 "features_computed_images", "features_computed_s", "features_loaded_images", "features_loaded_s",
                 "features_saved_s", "fit_setup_seconds", "interim_scoring_seconds", "post_fit_setup_seconds",
                 "post_fit_network_seconds", "fit_cache_saved_seconds", "post_fit_cache_saved_seconds")
#: Failure reason of a trial that was running when its search process was killed; such a trial runs again.
INTERRUPTED = "interrupted (the search was stopped or killed)"
#: Longest wait for another process that is creating the same SQLite store.
STORE_CREATION_WAIT_S = 300


def default_tracking_uri() -> str:
    path = (Path.cwd() / STATE_DIR / "mlflow.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _local_store_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI or the folder of a ``file:`` / plain-path store; else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path))
    return None if "://" in uri else Path(uri)


def writer_lock_path(uri: str) -> Path | None:
    """Lock file held by the one search writing to a local store (None for servers, which serialise writes)."""
    path = _local_store_path(uri)
    return None if path is None else path.with_name(f"{path.name}.search.lock")


#: Tracking URI schemes MLflow opens (a ``+driver`` suffix, as in ``postgresql+psycopg2``, is allowed).
_STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc",
                  "file")
#: Seconds an MLflow server has to accept a connection before it is reported unreachable.
SERVER_CONNECT_TIMEOUT_S = 5


def check_tracking_uri(uri: str) -> None:
    """Raise :class:`UsageError` for a tracking URI that names no usable store: an unknown scheme, a folder (MLflow's
    retired file store, unless ``MLFLOW_ALLOW_FILE_STORE`` is set) or a server that does not accept connections."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0].lower()
    usable = "sqlite:///PATH/mlflow.db, a database URL (postgresql://...) or http://HOST:PORT of an MLflow server"
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a one-letter scheme is a Windows drive)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise UsageError(f"tracking URI {uri!r} is a folder (MLflow's file store, which MLflow has retired); use "
                             f"{usable}, or set MLFLOW_ALLOW_FILE_STORE=true to keep a file store")
        return
    if scheme not in _STORE_SCHEMES:
        raise UsageError(f"tracking URI {uri!r} has an unknown scheme '{parsed.scheme}'; use {usable}")
    if scheme in ("http", "https"):
        try:
            address = (parsed.hostname, parsed.port or (443 if scheme == "https" else 80))
            if not parsed.hostname:
                raise ValueError("no host")
            socket.create_connection(address, timeout=SERVER_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise UsageError(f"cannot reach the MLflow server at {uri} ({reason}); start it (`mlflow server`) or "
                             "fix the tracking URI") from None


def _retry(fn, *args, attempts: int = 6, **kwargs):
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


class Tracker:
    """Search tracking on one MLflow store."""

    def __init__(self, tracking_uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri or default_tracking_uri()
        check_tracking_uri(self.uri)
        mlflow.set_tracking_uri(self.uri)
        database = _local_store_path(self.uri) if self.uri.startswith("sqlite:///") else None
        if database is None:
            self.client = MlflowClient(self.uri)
            return
        # the client creates the store (all schema migrations) when it is missing: one process at a time
        creation = FileLock(database.with_name(f"{database.name}.init.lock"))
        try:
            creation.acquire(STORE_CREATION_WAIT_S)
        except TimeoutError as exc:
            raise UsageError(f"the tracking store {database} is still being created by another process: {exc}. "
                             "If that process hangs, stop it and try again") from None
        except PermissionError:
            if not database.is_file():
                raise
            creation = None  # an existing store in a read-only folder: nothing will be created
        try:
            self.client = MlflowClient(self.uri)
        finally:
            if creation is not None:
                creation.release()

    # --- experiments and runs ---------------------------------------------------------------------------------
    def experiment(self, name: str) -> str:
        """Id of experiment ``name``, created (with artifacts beside a SQLite store) when missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            store = Path(self.uri[len("sqlite:///"):]).resolve()  # a relative sqlite:///mlflow.db is allowed
            location = (store.parent / "mlartifacts" / name.replace("/", "_")).as_uri()
        try:
            return _retry(self.client.create_experiment, name, artifact_location=location)
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_search(self, experiment_id: str, name: str, params: dict, tags: dict, files: list[Path]) -> str:
        run = _retry(self.client.create_run, experiment_id, run_name=name,
                     tags={"automl_ad.kind": "search", **{k: str(v) for k, v in tags.items()}})
        self.log_params(run.info.run_id, params)
        for path in files:
            _retry(self.client.log_artifact, run.info.run_id, str(path), "search")
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))[:6000])
                 for k, v in params.items()]
        for start in range(0, len(items), 90):
            _retry(self.client.log_batch, run_id, params=items[start:start + 90])

    def log_trial(self, experiment_id: str, parent_id: str, record: dict, artifacts: list[str]) -> str:
        """A child run for one finished, stopped or failed trial; returns its run id."""
        from mlflow.entities import Metric

        tags = {"mlflow.parentRunId": parent_id, "automl_ad.kind": "trial", "automl_ad.search": parent_id,
                "family": record["family"], "route": record.get("route", ""), "status": record["status"],
                "trial": record["trial_id"], "default_config": str(record.get("default", False))}
        if record.get("reason"):
            tags["failure_reason"] = record["reason"]
            tags["error"] = str(record.get("error", ""))[:4000]
        tags.update({key: str(record[key]) for key in ("node_id", "host") if record.get(key)})  # where it ran
        run = _retry(self.client.create_run, experiment_id, run_name=f"{record['family']}-{record['trial_id']}",
                     tags=tags)
        run_id = run.info.run_id
        self.log_params(run_id, {"family": record["family"], **record.get("params", {})})
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(record[k]), now, 0) for k in TRIAL_METRICS
                   if isinstance(record.get(k), (int, float)) and np.isfinite(record[k])]
        metrics += [Metric(k, float(v), now, 0) for k, v in record.items()
                    if k.startswith(("val_", "real_", "synthetic_")) and isinstance(v, (int, float)) and np.isfinite(v)]
        metrics += [Metric("interim_quality", float(q), now, int(e)) for e, q in record.get("curve", [])]
        for start in range(0, len(metrics), 900):
            _retry(self.client.log_batch, run_id, metrics=metrics[start:start + 900])
        for path in artifacts:
            _retry(self.client.log_artifact, run_id, path, "heatmaps")
        _retry(self.client.set_terminated, run_id, {"failed": "FAILED", "not started": "KILLED"}.get(record["status"],
                                                                                                  "FINISHED"))
        return run_id

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def trials(self, parent_id: str) -> list:
        """Child runs of a search."""
        return _retry(self.client.search_runs, [self.client.get_run(parent_id).info.experiment_id],
                      filter_string=f"tags.`automl_ad.search` = '{parent_id}'", max_results=50000)

    def finished_trial_ids(self, parent_id: str) -> set[str]:
        """Trials of a search that count as done: all recorded ones except those its killed process interrupted."""
        return {r.data.tags.get("trial") for r in self.trials(parent_id)
                if r.data.tags.get("failure_reason") != INTERRUPTED}

    # --- Pareto front -----------------------------------------------------------------------------------------
    def tag_front(self, parent_id: str) -> list:
        """Compute Pareto ranks over the finished trials, tag every one, log the plot; returns the front runs."""
        runs = [r for r in self.trials(parent_id) if r.data.tags.get("status") == "ok"
                and all(k in r.data.metrics for k, _ in OBJECTIVES)]
        if not runs:
            return []
        ranks = pareto_ranks(np.array([[r.data.metrics[k] for k, _ in OBJECTIVES] for r in runs]),
                             [d for _, d in OBJECTIVES])
        for run, rank in zip(runs, ranks):
            _retry(self.client.set_tag, run.info.run_id, "pareto_rank", str(int(rank)))
            _retry(self.client.set_tag, run.info.run_id, "pareto_front", str(rank == 0))
        front = [r for r, k in zip(runs, ranks) if k == 0]
        _retry(self.client.set_tag, parent_id, "front_size", str(len(front)))
        self._log_pareto_plot(parent_id, runs, ranks)
        return front

    def _log_pareto_plot(self, parent_id: str, runs: list, ranks: np.ndarray) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pareto.png"
            pareto_plot([{"family": r.data.tags.get("family"), **r.data.metrics} for r in runs], ranks, path)
            _retry(self.client.log_artifact, parent_id, str(path))

    def log_model(self, run_id: str, model_dir: Path) -> None:
        _retry(self.client.log_artifacts, run_id, str(model_dir), "model")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metric(self, run_id: str, key: str, value: float, step: int = 0) -> None:
        _retry(self.client.log_metric, run_id, key, float(value), step=int(step))

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """The finite numbers of ``metrics`` on run ``run_id`` (others are left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and np.isfinite(v)]
        for start in range(0, len(items), 900):
            _retry(self.client.log_batch, run_id, metrics=items[start:start + 900])

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of a run's metric."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def log_artifact(self, run_id: str, path: Path) -> None:
        _retry(self.client.log_artifact, run_id, str(path))

    def has_model(self, run_id: str) -> bool:
        """Whether a trial's model is logged with its run."""
        return "model" in {a.path for a in self.client.list_artifacts(run_id)}

    def log_pyfunc(self, code: Path, artifacts: dict, config: dict, run_id: str | None = None,
                   name: str = "model", experiment: str = "automl-ad/served") -> str:
        """Log an MLflow "model from code" (``code``) to run ``run_id`` or a new run of ``experiment``; returns its
        ``models:/`` URI."""
        import mlflow

        if run_id is None:
            run_id = _retry(self.client.create_run, self.experiment(experiment)).info.run_id
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts=artifacts,
                                           model_config=config, pip_requirements=["automl-ad"])
        return info.model_uri

    def finish_search(self, parent_id: str, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, parent_id, status)

    # --- reading ----------------------------------------------------------------------------------------------
    def latest_search(self, experiment: str) -> str:
        """Run id of the newest search in experiment ``experiment`` (a name or an id)."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None and experiment.isdigit():
            exp = self.client.get_experiment(experiment)
        if exp is None:
            names = [e.name for e in self.client.search_experiments()]
            raise UsageError(f"no experiment '{experiment}' in {self.uri}. Experiments: {', '.join(names) or 'none'}")
        runs = self.client.search_runs([exp.experiment_id], filter_string="tags.`automl_ad.kind` = 'search'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise UsageError(f"experiment '{exp.name}' holds no search yet; run `automl-ad search` first")
        return runs[0].info.run_id
