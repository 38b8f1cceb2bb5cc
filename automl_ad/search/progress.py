"""The search's Tune callback: records every trial in MLflow as it ends, teaches the cost predictor what trials
cost, tracks the best validation quality over time (``best_quality`` on the search run, step = seconds into the
search) and shows a live view of the search."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from ray.tune import Callback

from automl_ad.data.geometry import geometry_label
from automl_ad.defaults import SEARCH_BEST_QUALITY_METRIC
from automl_ad.evaluation.objectives import OBJECTIVE_METRICS, OBJECTIVE_MODES, pareto_ranks
from automl_ad.features import FeatureCache
from automl_ad.folders import disk_cap_mb
from automl_ad.search.cost_predictor import CostPredictor, Fidelity, TrialSizes, TrialTimes
from automl_ad.search.trial import NODE_FILE


def _failure_text(record: dict) -> str:
    """"reason: error", without repeating a reason the error starts with (an exception's type name)."""
    reason, error = str(record.get("reason", "")), str(record.get("error", ""))
    return error if error.startswith(reason) else f"{reason}: {error}"


def trial_line(record: dict) -> str:
    """The live view's line for a finished trial: mark, family, id, geometry, then its quality and cost, or why it
    failed (shortened at a word to 300 characters; the whole reason is in MLflow)."""
    mark = {"ok": "✓", "screened": "·", "stopped early": "↓", "failed": "✗", "not started": "–"}[record["status"]]
    quality = record.get("quality")
    detail = (f"quality {quality:.3f}, {record.get('throughput', 0):.1f} img/s, {record.get('memory_mb', 0):.0f} MB"
              if record["status"] in ("ok", "screened") else
              textwrap.shorten(_failure_text(record), 300, placeholder=" … (the whole reason: in MLflow)")
              if record["status"] in ("failed", "not started")
              else f"stopped at epoch {record['curve'][-1][0] if record['curve'] else '?'}")
    if record["status"] == "screened":
        detail += f" (screening: {Fidelity(**record['fidelity']).describe()})"
    if record.get("training_cut_by_time"):
        epochs = record.get("epochs_trained")
        detail += (f" (training stopped by the time limit after {epochs:.0f} epochs)" if epochs else
                   " (fit stopped by the time limit, with a smaller model than configured)")
    where = geometry_label(record.get("params") or {}) or ""
    return f"{mark} {record['family']:<12} {record['trial_id']:<14} {where:<18} {detail}"


class SearchCallback(Callback):
    """Logs finished, stopped and failed trials as MLflow child runs; keeps disk use under the caps."""

    def __init__(self, tracker, experiment_id: str, parent_id: str, request, work_dir: Path, budget_s: float,
                 console=None, predictor: CostPredictor | None = None, sizes: TrialSizes | None = None,
                 elapsed_before_s: float = 0.0):
        self.tracker, self.experiment_id, self.parent_id = tracker, experiment_id, parent_id
        self.request, self.work_dir = request, Path(work_dir)
        self.deadline = time.monotonic() + budget_s
        self.predictor, self.sizes = predictor, sizes
        self._started, self._elapsed_before = time.monotonic(), elapsed_before_s
        self.best_so_far: list[tuple[float, float]] = self._logged_best()
        self.curves: dict[str, list] = {}
        self.records: list[dict] = []
        self.running = 0
        self.console = console
        self._live = None
        self._last_draw = 0.0
        if console is not None and console.is_terminal:
            from rich.live import Live

            self._live = Live(self._view(), console=console, refresh_per_second=2, transient=False)
            self._live.start()

    def __getstate__(self) -> dict:
        """Tune pickles its configuration for restoring; this callback lives in the driver only."""
        return {}

    # --- Tune hooks -------------------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running = sum(t.status == "RUNNING" for t in trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and result.get("quality") is not None:
            self.curves.setdefault(trial.trial_id, []).append((int(result["epoch"]), float(result["quality"])))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        complete = "throughput" in result and result.get("quality") is not None
        fidelity = _fidelity(trial.config)
        status = "stopped early" if not complete else "ok" if fidelity is None or fidelity.rung == 0 else "screened"
        record = self._record(trial, status, result)
        if complete:
            self._learn_cost(trial.config, result)
        artifacts = json.loads(result.get("heatmaps", "[]")) if complete else []
        self._log(record, artifacts)

    def on_trial_error(self, iteration, trials, trial, **info):
        failure = self.work_dir / "trials" / trial.trial_id / "failure.json"
        details = json.loads(failure.read_text()) if failure.is_file() else self._ray_failure(trial)
        if details["reason"] == "timeout" and self.predictor is not None and _fidelity(trial.config) is not None:
            fidelity = _fidelity(trial.config)
            self.predictor.observe_timeout(self.sizes.work(trial.config["family"], trial.config["params"],
                                                           fidelity), float(trial.config.get("timeout_s", 0)))
            self.predictor.observe_prediction(float(trial.config.get("predicted_s") or 0),
                                              float(trial.config.get("timeout_s", 0)),
                                              str(trial.config.get("prediction_basis", "")))
        status = "not started" if details.get("not_started") else "failed"
        self._log(self._record(trial, status, {"reason": details["reason"], "error": details["error"]}), [])

    def on_step_end(self, iteration, trials, **info):
        self.running = sum(t.status == "RUNNING" for t in trials)
        if time.monotonic() - self._last_draw > 0.5:
            self._draw()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _learn_cost(self, config: dict, result: dict) -> None:
        """Teach the predictor what this trial cost: its fit seconds for the epochs it really trained (and those of
        its non-linear part), its seconds after the fit, its wall time, and of these its network set-up and what
        cached features spared it."""
        fidelity = _fidelity(config)
        if self.predictor is None or fidelity is None or result.get("time_total_s") is None:
            return
        epochs = result.get("epochs_trained")
        if fidelity.epochs is not None and isinstance(epochs, (int, float)) and epochs >= 1:
            fidelity = replace(fidelity, epochs=int(epochs))

        def seconds(key: str) -> float | None:
            return None if result.get(key) is None else float(result[key])

        times = TrialTimes(float(result.get("fit_seconds", 0.0)), float(result["time_total_s"]),
                           eval_s=seconds("post_fit_seconds"), extra_s=seconds("fit_extra_seconds"),
                           fit_setup_s=seconds("fit_setup_seconds") or 0.0,
                           interim_s=seconds("interim_scoring_seconds") or 0.0,
                           eval_setup_s=seconds("post_fit_setup_seconds") or 0.0,
                           eval_network_s=seconds("post_fit_network_seconds"),
                           fit_cached_s=seconds("fit_cache_saved_seconds") or 0.0,
                           eval_cached_s=seconds("post_fit_cache_saved_seconds") or 0.0)
        self.predictor.observe(self.sizes.work(config["family"], config["params"], fidelity), times,
                               config["params"])
        self.predictor.observe_prediction(float(config.get("predicted_s") or 0), times.wall_s,
                                          str(config.get("prediction_basis", "")))

    def elapsed(self) -> float:
        """Seconds into the search, time spent before a resume included."""
        return self._elapsed_before + time.monotonic() - self._started

    def _logged_best(self) -> list[tuple[float, float]]:
        """The best-so-far curve already logged (a resumed search continues it)."""
        try:
            history = self.tracker.metric_history(self.parent_id, SEARCH_BEST_QUALITY_METRIC)
        except Exception:  # noqa: BLE001 - a store that cannot be read starts a fresh curve
            return []
        return sorted((float(step), float(value)) for step, value in history)

    def _update_best(self, record: dict) -> None:
        """Log the best-so-far quality when a complete trial beats it: full fidelity or screened (a screened trial
        saved its model too, and the search keeps the best of them when no full-fidelity trial beats it)."""
        quality = record.get("quality")
        if record["status"] not in ("ok", "screened") or not isinstance(quality, (int, float)) \
                or not np.isfinite(quality):
            return
        if self.best_so_far and quality <= self.best_so_far[-1][1]:
            return
        point = (round(self.elapsed(), 1), float(quality))
        self.best_so_far.append(point)
        try:
            self.tracker.log_metric(self.parent_id, SEARCH_BEST_QUALITY_METRIC, point[1], step=int(point[0]))
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not end the search
            self._say(f"[yellow]could not record the best quality so far in MLflow: {exc}[/]")

    def _tag_fidelity(self, run_id: str, record: dict) -> None:
        """Fidelity, predicted seconds and time limit of a trial, as tags of its run."""
        fidelity = record.get("fidelity")
        tags = {}
        if fidelity:
            tags.update({"fidelity": "full" if Fidelity(**fidelity).full else Fidelity(**fidelity).describe(),
                         "fidelity_train_fraction": f"{fidelity['train_fraction']:.4g}",
                         "fidelity_train_images": str(fidelity["train_images"]),
                         "fidelity_rung": str(fidelity["rung"])})
            if fidelity.get("validation_images") is not None:
                tags["fidelity_validation_images"] = str(fidelity["validation_images"])
            if fidelity.get("full_epochs") is not None:
                tags.update(fidelity_epochs=str(fidelity["epochs"]), fidelity_full_epochs=str(fidelity["full_epochs"]))
        for key in ("predicted_s", "timeout_s"):
            if isinstance(record.get(key), (int, float)):
                tags[{"predicted_s": "predicted_seconds", "timeout_s": "time_limit_s"}[key]] = f"{record[key]:.1f}"
        if record.get("prediction_basis"):
            tags["prediction_basis"] = record["prediction_basis"]
        if tags:
            self.tracker.set_tags(run_id, tags)

    def _record(self, trial, status: str, result: dict) -> dict:
        config = trial.config
        record = {"trial_id": trial.trial_id, "family": config.get("family"), "params": config.get("params", {}),
                  "default": bool(config.get("default")), "status": status,
                  **{k: config[k] for k in ("fidelity", "predicted_s", "timeout_s", "prediction_basis") if k in config},
                  "route": self.request.routes.get(config.get("family"), ""),
                  "curve": self.curves.get(trial.trial_id, []), **self._node(trial), **result}
        if status in ("failed", "not started"):
            record.pop("quality", None)
        record["wall_seconds"] = result.get("time_total_s")
        return record

    def _node(self, trial) -> dict:
        """The Ray node a trial ran on (``node_id``, ``host``), as its trainable wrote it; empty if it never started."""
        path = self.work_dir / "trials" / trial.trial_id / NODE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _ray_failure(self, trial) -> dict:
        """Reason and error of a trial that Ray ended rather than the trial itself, e.g. its worker or node died.

        Tune has just written the error beside the trial (its storage copy comes later): the exception, pickled by
        Tune in this process, and its text.
        """
        from ray import cloudpickle
        from ray.exceptions import RayActorError, RayTaskError

        error, text = None, ""
        try:
            error = cloudpickle.loads(Path(trial.pickled_error_file).read_bytes())
        except Exception:  # noqa: BLE001 - no or unreadable pickled error: the text version remains
            pass
        try:
            text = str(error) if error is not None else Path(trial.error_file).read_text(errors="replace")
        except (OSError, TypeError):
            pass
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failure #")]
        message = lines[0] if lines else "Ray recorded no error for this trial"
        if isinstance(error, RayActorError):
            node = self._node(trial)
            where = f"node {node['node_id']} on {node['host']}" if node else "its node"
            return {"reason": "worker lost", "error": f"the Ray worker running this trial on {where} was lost (the "
                                                      f"worker process or its node died): {type(error).__name__}: "
                                                      f"{message}"}
        cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
        if cause is not None:  # raised in the trainable itself (outside the trial process): that exception
            return {"reason": type(cause).__name__, "error": f"{type(cause).__name__}: {cause}"}
        return {"reason": "error", "error": message}

    def _log(self, record: dict, artifacts: list[str]) -> None:
        try:
            run_id = self.tracker.log_trial(self.experiment_id, self.parent_id, record, artifacts)
            self._tag_fidelity(run_id, record)
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not end the search
            self._say(f"[yellow]could not record trial {record['trial_id']} in MLflow: {exc}[/]")
        self.records.append(record)
        self._update_best(record)
        front = self._front_ids()
        trim_disk(self.work_dir, front, self.request.artifact_cap_mb)
        FeatureCache().trim(self.request.cache_cap_mb)
        self._say(trial_line(record))
        self._draw()

    def _front_ids(self) -> set[str]:
        ok = [r for r in self.records if r["status"] == "ok"]
        if not ok:
            return set()
        ranks = pareto_ranks(np.array([[r[m] for m in OBJECTIVE_METRICS] for r in ok]), OBJECTIVE_MODES)
        return {r["trial_id"] for r, k in zip(ok, ranks) if k == 0}

    def _view(self):
        from rich.table import Table

        ok = [r for r in self.records if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["quality"], default=None)
        table = Table(title="automl-ad search", show_header=False, box=None)
        table.add_row("trials", f"{len(ok)} done, {self.running} running, "
                                f"{sum(r['status'] == 'stopped early' for r in self.records)} stopped early, "
                                f"{sum(r['status'] == 'failed' for r in self.records)} failed, "
                                f"{sum(r['status'] == 'not started' for r in self.records)} not started")
        table.add_row("best quality", f"{best['quality']:.4f} ({best['family']})" if best else "-")
        table.add_row("best so far", "  ".join(f"{q:.3f} at {t:.0f} s" for t, q in self.best_so_far[-4:]) or "-")
        table.add_row("Pareto front", f"{len(self._front_ids())} trial(s)")
        table.add_row("budget left", f"{max(0.0, self.deadline - time.monotonic()):.0f} s")
        return table

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        if self._live is not None:
            self._live.update(self._view())

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
        else:
            print(text)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def trim_disk(work_dir: Path, keep: set[str], cap_mb: float) -> None:
    """Delete saved models of trials not in ``keep`` (dominated ones), oldest first, above ``cap_mb`` or above what
    leaves the disk its reserve of free space (``disk_cap_mb``)."""
    trials = Path(work_dir) / "trials"
    models = sorted((p for p in trials.glob("*/model") if p.parent.name not in keep), key=lambda p: p.stat().st_mtime)
    total = sum(f.stat().st_size for p in trials.glob("*/model") for f in p.rglob("*") if f.is_file()) / 2**20
    cap_mb = disk_cap_mb(trials, total, cap_mb)
    for model in models:
        if total <= cap_mb:
            break
        size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20
        shutil.rmtree(model, ignore_errors=True)
        total -= size


def _fidelity(config: dict) -> Fidelity | None:
    """The fidelity a trial ran at (None for trials planned without one)."""
    return Fidelity(**config["fidelity"]) if config.get("fidelity") else None
