"""Export a searched model: choose the run, calibrate its thresholds on held-out normal images, write the package."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from automl_ad.defaults import STATE_DIR
from automl_ad.deploy.thresholds import (DEFAULT_FALSE_ALARM_RATE, calibrate_image_threshold,
                                         calibrate_pixel_threshold, f1_optimal_threshold)
from automl_ad.errors import UsageError

OBJECTIVES = ("quality", "throughput", "memory", "balanced")


def choose_run(tracker, experiment: str | None, objective: str) -> str:
    """The front member of the newest search that is best for ``objective``."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    from automl_ad.tracking.board import leaderboard

    front = [r for r in leaderboard(experiment, tracking_uri=tracker.uri, pareto=True) if r.get("status") == "ok"]
    if not front:
        raise UsageError("the newest search has no complete trial on its Pareto front; run or resume a search")
    if objective == "quality":
        best = max(front, key=lambda r: r["quality"])
    elif objective == "throughput":
        best = max(front, key=lambda r: r["throughput"])
    elif objective == "memory":
        best = min(front, key=lambda r: r["memory_mb"])
    else:  # equal weight to each objective after min-max scaling (throughput on a log scale)
        def scaled(key, sign, transform=lambda v: v):
            values = [transform(r[key]) for r in front]
            low, high = min(values), max(values)
            return [sign * (v - low) / (high - low) if high > low else 0.0 for v in values]
        total = np.sum([scaled("quality", 1), scaled("throughput", 1, math.log), scaled("memory_mb", -1)], axis=0)
        best = front[int(np.argmax(total))]
    return best["run_id"]


def export_run(tracker, run_id: str, out: str | Path, far: float = DEFAULT_FALSE_ALARM_RATE,
               overwrite: bool = False, say=print) -> Path:
    """Package the model of trial ``run_id``: thresholds from the search's held-out normals, test metrics.
    ``out`` never replaces anything but an automl-ad package (with ``overwrite``), nor a folder holding the
    tracking store, automl-ad's working state or the dataset."""
    from automl_ad.data import open_dataset
    from automl_ad.deploy.package import check_package_target, export_package
    from automl_ad.detectors import Detector
    from automl_ad.evaluation.metrics import evaluate
    from automl_ad.search.engine import work_dir_for
    from automl_ad.search.validation import prepare_search_data

    try:
        run = tracker.client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise UsageError(f"no run {run_id} in {tracker.uri} ({exc})") from exc
    if run.data.tags.get("automl_ad.kind") != "trial" or run.data.tags.get("status") != "ok":
        raise UsageError(f"run {run_id} is not a completed search trial")
    parent = tracker.client.get_run(run.data.tags["automl_ad.search"])
    dataset = open_dataset(parent.data.params["data"])
    protected = _protected_paths(tracker, dataset.root, work_dir_for(dataset))
    check_package_target(out, overwrite, protected)
    seed = int(parent.data.params.get("seed", 0))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(tracker, run, work_dir_for(dataset), Path(tmp))
        detector = Detector.load(model_dir)
        data = prepare_search_data(dataset, work_dir_for(dataset), parent.data.params.get("validation", "auto"), seed)
        normals = data.validation.subset(np.flatnonzero(data.validation.labels == 0))
        say(f"Calibrating thresholds on {len(normals)} held-out normal images (target false-alarm rate {far:g}) ...")
        normal_scores = detector.score_samples(normals)
        thresholds = {"image": calibrate_image_threshold(normal_scores.image_scores, far).to_dict(),
                      "active": "image"}
        if normal_scores.anomaly_maps is not None:
            thresholds["pixel"] = calibrate_pixel_threshold(normal_scores.anomaly_maps, far).to_dict()
        metrics = {"validation": {k[4:]: v for k, v in run.data.metrics.items() if k.startswith("val_")},
                   "validation_kind": data.validation_kind}
        if data.validation_kind == "real":
            scores = detector.score_samples(data.validation)
            thresholds["image_f1_optimal"] = f1_optimal_threshold(data.validation.labels, scores.image_scores).to_dict()
        if len(data.test) and data.test.labels.any():
            say(f"Scoring the {len(data.test)} test images (never used for selection) ...")
            test = detector.score_samples(data.test)
            metrics["test"] = evaluate(data.test.labels, test.image_scores, test.anomaly_maps, data.test.masks())
            limit = thresholds["image"]["value"]
            normal_test = test.image_scores[data.test.labels == 0]
            metrics["test"]["false_alarm_rate"] = float((normal_test > limit).mean()) if len(normal_test) else None
            metrics["test"]["detection_rate"] = float((test.image_scores[data.test.labels == 1] > limit).mean())
        cost = {k: run.data.metrics.get(k) for k in ("latency_ms_p50", "latency_ms_p95", "throughput_ips",
                                                       "peak_rss_mb_score", "peak_rss_mb_fit", "fit_seconds",
                                                       "model_mb")}
        training = {"dataset": str(dataset.root), "fingerprint": dataset.fingerprint(), "n_train": len(data.train),
                    "run_id": run_id, "search_run_id": parent.info.run_id, "tracking_uri": tracker.uri}
        return export_package(detector, out, thresholds, metrics, cost, training, overwrite=overwrite,
                              parity_images=parity_images(data.validation), protected=protected)


def _protected_paths(tracker, dataset_root: Path, work_dir: Path) -> tuple[Path, ...]:
    """What an export must never replace: automl-ad's working state, the search's folder, the dataset and a local
    SQLite tracking store."""
    paths = [Path.cwd() / STATE_DIR, work_dir, Path(dataset_root)]
    if tracker.uri.startswith("sqlite:///"):
        paths.append(Path(tracker.uri[len("sqlite:///"):]))
    return tuple(paths)


def parity_images(validation, per_label: int = 3):
    """A few validation images, normal and anomalous, for the ONNX parity check (outputs with a real span)."""
    picks = [int(i) for label in (0, 1) for i in np.flatnonzero(validation.labels == label)[:per_label]]
    return validation.subset(picks)


def trial_model_dir(tracker, run, work_dir: Path, tmp: Path) -> Path:
    """Where the saved model of trial ``run`` is (downloaded into ``tmp`` when it is logged in MLflow); raises
    UsageError when it was not kept. Public for the report; the same as export uses."""
    return _model_dir(tracker, run, work_dir, tmp)


def _model_dir(tracker, run, work_dir: Path, tmp: Path) -> Path:
    """The trial's saved model: logged in MLflow (front members) or still in the search's working folder."""
    if any(a.path == "model" for a in tracker.client.list_artifacts(run.info.run_id)):
        return Path(tracker.client.download_artifacts(run.info.run_id, "model", str(tmp)))
    local = work_dir / "trials" / run.data.tags["trial"] / "model"
    if local.is_dir():
        return local
    raise UsageError(f"the model of run {run.info.run_id} was not kept (only Pareto-front models are logged; "
                     "dominated ones are evicted to respect the disk cap). Export a front member: "
                     "automl-ad leaderboard --pareto")
