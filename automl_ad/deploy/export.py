"""Export a searched model: choose the trial, calibrate its thresholds on the search's held-out normal images,
state its operating point, write the package. Everything is read from the tracking store (the trial, its model,
the data split it was ranked on), so export works from any working directory."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automl_ad.data.split import ANOMALY_WORDS, SearchSplit
from automl_ad.defaults import CALIBRATION_FOLDS, STATE_DIR
from automl_ad.deploy.appearance import training_appearance
from automl_ad.deploy.out_of_fold import out_of_fold_scores, predicted_refit_seconds, refit_refusal
from automl_ad.deploy.package import check_package_target, export_package, verify_package
from automl_ad.deploy.serving import log_package
from automl_ad.deploy.thresholds import (
    DEFAULT_FALSE_ALARM_RATE,
    Threshold,
    calibrate_image_threshold,
    calibrate_pixel_threshold,
    f1_optimal_threshold,
    operating_points,
    rates_at,
)
from automl_ad.detectors import Detector
from automl_ad.errors import UsageError
from automl_ad.evaluation.metrics import evaluate, smallest_far
from automl_ad.tracking.records import SearchStore, TrialRecord

OBJECTIVES = ("quality", "throughput", "memory", "balanced")
#: Below this detection rate of validation defects at the target false-alarm rate, export warns.
LOW_DETECTION_RATE = 0.5


def choose_run(store: SearchStore, target: str | None, objective: str, say=None) -> TrialRecord:
    """The Pareto-front trial of the search meant by ``target`` (None: the newest) that is best for ``objective``
    among those meeting the search's deployment limits (:func:`within_limits`); ``say`` hears why."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    search = store.resolve(target)
    front = store.front(search.run_id)
    if not front and not search.ended:
        complete = sum(t.complete for t in store.trials(search.run_id))
        raise UsageError(f"search {search.run_id} has not ended (still running, or killed before it ended): "
                         f"{complete} complete trial(s) so far; its Pareto front is ranked when it ends. Wait for it, "
                         "continue a killed one with `automl-ad search DATA --resume`, or export one trial by its run "
                         "id (`automl-ad leaderboard` lists them)")
    if not front:
        raise UsageError(f"search {search.run_id} has no complete trial on its Pareto front; run or resume a search")
    return best_for(within_limits(front, search.limits, say), objective)


def within_limits(front: list[TrialRecord], limits: dict, say=None) -> list[TrialRecord]:
    """The trials whose measured p50 latency and model size meet ``limits`` (the constraint profile's
    ``latency_ms`` and ``model_mb``); all of them, with a note to ``say``, when none does."""
    def meets(trial: TrialRecord) -> bool:
        return all(trial.metrics.get(metric, math.inf) <= limits[key]
                   for key, metric in (("latency_ms", "latency_ms_p50"), ("model_mb", "model_mb")) if key in limits)

    kept = [t for t in front if meets(t)]
    if say is not None and limits:
        stated = ", ".join(f"{key.replace('_', ' ')} <= {value:g}" for key, value in limits.items())
        if not kept:
            fastest = min(front, key=lambda t: t.metrics.get("latency_ms_p50", math.inf))
            say(f"warning: no Pareto-front trial meets the profile's limits ({stated}; measured on this machine); "
                f"the fastest takes {fastest.metrics.get('latency_ms_p50', math.nan):.1f} ms per image and "
                f"{fastest.metrics.get('model_mb', math.nan):.1f} MB. Choosing among all of them; a longer --budget "
                "tries more configurations, or relax the profile's limits.")
        elif len(kept) < len(front):
            say(f"{len(front) - len(kept)} of {len(front)} Pareto-front trials are left out: they exceed the "
                f"profile's limits ({stated}; measured on this machine)")
    return kept or front


def best_for(trials: list[TrialRecord], objective: str) -> TrialRecord:
    """The trial best for ``objective``: the highest validation quality (ties: the higher throughput), the highest
    throughput, the least memory, or ``balanced``: equal weight to quality, log-throughput and memory after
    min-max scaling over ``trials``."""
    if objective == "quality":
        return max(trials, key=lambda t: (t.metrics["quality"], t.metrics["throughput"]))
    if objective == "throughput":
        return max(trials, key=lambda t: t.metrics["throughput"])
    if objective == "memory":
        return min(trials, key=lambda t: t.metrics["memory_mb"])

    def scaled(key, sign, transform=lambda v: v):  # equal weight after min-max scaling (throughput on a log scale)
        values = [transform(t.metrics[key]) for t in trials]
        low, high = min(values), max(values)
        return [sign * (v - low) / (high - low) if high > low else 0.0 for v in values]
    total = np.sum([scaled("quality", 1), scaled("throughput", 1, math.log), scaled("memory_mb", -1)], axis=0)
    return trials[int(np.argmax(total))]


@dataclass
class Calibration:
    """Thresholds calibrated on held-out normals, and what they mean on the validation images."""

    thresholds: dict
    validation_rates: dict
    operating_points: list[dict]
    warnings: list[str] = field(default_factory=list)
    #: (path, score) of the normals (held out, or training images scored out of fold) that set the image threshold:
    #: those at or above it, else the highest-scoring one (the threshold is its score, or a tail fit above it); none
    #: in memory
    threshold_setters: list[tuple[str, float]] = field(default_factory=list)


def calibrate(detector, split: SearchSplit, far: float = DEFAULT_FALSE_ALARM_RATE, say=print) -> Calibration:
    """Image (and pixel) thresholds at false-alarm rate ``far`` from the validation normals (joined by the training
    normals scored out of fold when those are too few for ``far`` and the family refits quickly,
    :mod:`~automl_ad.deploy.out_of_fold`); the false-alarm and detection rates they give on the validation images,
    the threshold → rates table, and plain warnings."""
    normals = split.normal_validation()
    say(f"Calibrating thresholds on {len(normals)} held-out normal images (target false-alarm rate {far:g}) ...")
    validation = split.validation_for(detector.trains_on_anomalies)  # never its own training anomaly kinds
    scores = detector.score_samples(validation)
    labels = validation.labels
    held_out = scores.image_scores[labels == 0]
    normal_scores, normal_paths, refusal = _normal_scores(detector, split, validation, held_out, far, say)
    image = calibrate_image_threshold(normal_scores, far)
    image.n_out_of_fold = len(normal_scores) - len(held_out)
    thresholds = {"image": image.to_dict(), "active": "image"}
    if scores.anomaly_maps is not None:
        thresholds["pixel"] = calibrate_pixel_threshold(scores.anomaly_maps[labels == 0], far).to_dict()
    if split.validation_kind == "real" and labels.any():
        thresholds["image_f1_optimal"] = f1_optimal_threshold(labels, scores.image_scores).to_dict()
    rates = rates_at(image.value, labels, scores.image_scores)
    table = operating_points(normal_scores, scores.image_scores[labels == 1])
    warnings = [w for w in (_few_normals_warning(image, len(held_out), far, refusal),
                            _low_detection_warning(split.validation_kind, validation, scores.image_scores,
                                                   normal_scores, image.value, far)) if w]
    return Calibration(thresholds, rates, table, warnings, _threshold_setters(normal_paths, normal_scores, image.value))


def _few_normals_warning(image: Threshold, n_held_out: int, far: float, refusal: str | None) -> str | None:
    """A warning when the normal scores behind ``image`` are too few to set a threshold at ``far`` from data."""
    floor = smallest_far(image.n_normal)
    if far >= floor:
        return None
    reachable = math.ceil(floor * 1000) / 1000
    empirical = image.method == "empirical"
    where = ("the highest of their scores, which about" if empirical else
             "extrapolated by a tail fit above the highest of their scores, which fewer than")
    counted = (f"{image.n_normal} normal scores ({n_held_out} held-out images and {image.n_out_of_fold} training "
               "images scored out of fold)" if image.n_out_of_fold else f"{image.n_normal} held-out normal images")
    unfolded = f" The training images were not scored out of fold: {refusal}." if refusal else ""
    return (f"only {counted}: a false-alarm rate of {far:g} needs at least {math.ceil(1 / far) - 1} to be set from "
            f"data, so the threshold is {where} 1 in {image.n_normal + 1} new normal images exceed "
            f"({'' if empirical else 'under '}{floor:.0%} false alarms).{unfolded} Add normal images to the training "
            f"folder (a share is held out), or export with --false-alarm-rate {reachable:g}.")


def _low_detection_warning(validation_kind: str, validation, image_scores: np.ndarray, normal_scores: np.ndarray,
                           threshold: float, far: float) -> str | None:
    """A warning when ``threshold`` detects under half the validation anomalies; judged on the real defects where
    there are some (synthetic anomalies beside a few of them are easier to catch)."""
    labels = validation.labels
    kind, judged = ANOMALY_WORDS[validation_kind], np.ones(len(labels), bool)
    if validation_kind == "mixed":
        kind, judged = ANOMALY_WORDS["real"], np.array([k is None for k in validation.kinds or [None] * len(labels)])
    detected = rates_at(threshold, labels[judged], image_scores[judged])["detection_rate"]
    if detected is None or detected >= LOW_DETECTION_RATE:
        return None
    table = operating_points(normal_scores, image_scores[judged & (labels == 1)])
    best = max((r for r in table if r["detection_rate"] is not None), key=lambda r: r["detection_rate"])
    return (f"at the target false-alarm rate {far:g} this model detects only {detected:.0%} of the validation "
            f"{kind}. Options: accept more false alarms (at {best['target_false_alarm_rate']:g} it detects "
            f"{best['detection_rate']:.0%}; export with --false-alarm-rate), search longer or with "
            "--metric detection_at_far, or label more defects so the search can rank on them.")


def _normal_scores(detector, split: SearchSplit, validation, held_out: np.ndarray, far: float,
                   say) -> tuple[np.ndarray, list[str] | None, str | None]:
    """The normal scores a threshold at ``far`` is set on, their paths, and why the training normals were not
    scored out of fold where they were needed: the held-out ones (``held_out``, of ``validation``), joined by the
    training normals scored out of fold when they are too few for ``far`` and the model refits quickly."""
    paths = _paths(validation, validation.labels == 0)
    if far >= smallest_far(len(held_out)):
        return held_out, paths, None
    refusal = refit_refusal(detector, len(split.train))
    if refusal is not None:
        return held_out, paths, refusal
    say(f"  ... too few for a false-alarm rate of {far:g}: refitting the model on {CALIBRATION_FOLDS} folds of the "
        f"{len(split.train)} training images to score each one unseen (about "
        f"{predicted_refit_seconds(detector) or 0:.0f} s) ...")
    reference = validation.subset(np.flatnonzero(validation.labels == 0))
    scores = np.r_[held_out, out_of_fold_scores(detector, split.train, reference, held_out)]
    train_paths = _paths(split.train, np.ones(len(split.train), bool))
    return scores, None if paths is None or train_paths is None else paths + train_paths, None


def _paths(images, chosen: np.ndarray) -> list[str] | None:
    """The paths of ``images`` where ``chosen`` (None for images held in memory)."""
    return None if images.paths is None else [str(p) for p, keep in zip(images.paths, chosen) if keep]


def _threshold_setters(paths: list[str] | None, normal_scores: np.ndarray, threshold: float) -> list[tuple[str, float]]:
    """The normals that set ``threshold`` (see :attr:`Calibration.threshold_setters`), highest first."""
    if paths is None or not len(normal_scores):
        return []
    order = np.argsort(-normal_scores, kind="stable")
    above = [i for i in order if normal_scores[i] >= threshold] or [order[0]]
    return [(paths[i], float(normal_scores[i])) for i in above]


def screened_setters_warning(calibration: Calibration, screen: dict | None) -> str | None:
    """A warning when recommend's screen (``screen.json``) named normals that set the threshold: a defect filed as
    good among them raises the threshold for every image."""
    named = {item.get("image") for item in (screen or {}).get("suspects") or [] if isinstance(item, dict)}
    setters = [(path, score) for path, score in calibration.threshold_setters if path in named]
    if not setters:
        return None
    listed = ", ".join(f"{path} (score {score:.4g})" for path, score in setters[:5])
    return (f"the image threshold is set by {len(setters)} normal image(s) that recommend's screen named as "
            f"unlike the other good images: {listed}. If one is defective, move it to a defect folder and search "
            "again: the threshold would drop and catch more defects.")


def export_run(store: SearchStore, run_id: str, out: str | Path, far: float = DEFAULT_FALSE_ALARM_RATE,
               overwrite: bool = False, say=print) -> Path:
    """Package the model of trial ``run_id``: thresholds from the search's held-out normals, its operating point
    on validation and test. ``out`` never replaces anything but an automl-ad package (with ``overwrite``), nor a
    folder holding the tracking store, automl-ad's working state, the search's folder or the dataset. Refused
    (:class:`~automl_ad.errors.DataChangedError`) when the search's images are gone or changed since the search
    (:func:`~automl_ad.tracking.records.check_split_data`): the package's training fingerprint is the search's."""
    trial = store.trial(run_id)
    if not trial.ok:
        raise UsageError(f"run {run_id} is not a completed search trial (status {trial.status})")
    search = store.search(trial.search_id)
    protected = _protected_paths(store.uri, search)
    check_package_target(out, overwrite, protected)
    split = store.split(search, check=True, say=say)  # the images as the search used them, or DataChangedError
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector.load(store.model_dir(trial, Path(tmp), search.work_dir))
        calibration = calibrate(detector, split, far, say)
        screened = screened_setters_warning(calibration, store.artifact_json(search.run_id, "search/screen.json"))
        if screened:
            calibration.warnings.append(screened)
        metrics = {"validation": {k[4:]: v for k, v in trial.metrics.items() if k.startswith("val_")},
                   "validation_kind": split.validation_kind, "validation_at_threshold": calibration.validation_rates}
        if len(split.test) and split.test.labels.any():
            say(f"Scoring the {len(split.test)} test images (never used for selection) ...")
            test = detector.score_samples(split.test)
            metrics["test"] = evaluate(split.test.labels, test.image_scores, test.anomaly_maps, split.test.masks())
            metrics["test"].update(rates_at(calibration.thresholds["image"]["value"], split.test.labels,
                                            test.image_scores))
        cost = {k: trial.metrics.get(k) for k in ("latency_ms_p50", "latency_ms_p95", "throughput_ips",
                                                   "peak_rss_mb_score", "peak_rss_mb_fit", "fit_seconds", "model_mb")}
        training = {"dataset": search.data, "fingerprint": search.fingerprint, "n_train": len(split.train),
                    "run_id": run_id, "search_run_id": search.run_id, "tracking_uri": store.uri,
                    "images": training_appearance(split.train)}
        path = export_package(detector, out, calibration.thresholds, metrics, cost, training, overwrite=overwrite,
                              parity_images=parity_images(split.validation_for(detector.trains_on_anomalies)),
                              protected=protected,
                              operating=calibration.operating_points)
    _say_operating_point(calibration, metrics, far, say)
    return path


def _say_operating_point(calibration: Calibration, metrics: dict, far: float, say) -> None:
    """What the threshold will do in production, in rounded figures, and any warning. On synthetic (or mixed)
    validation the detected ones are (partly) synthetic anomalies, not defects: said so."""
    for name, rates in (("validation", calibration.validation_rates), ("test", metrics.get("test"))):
        if rates and rates.get("detection_rate") is not None:
            alarms = rates.get("false_alarm_rate")
            kind = metrics.get("validation_kind") if name == "validation" else None
            caught = ANOMALY_WORDS[kind] if kind in ("synthetic", "mixed") else "defects"
            say(f"At the threshold (target false-alarm rate {far:g}) on {name}: false alarms "
                f"{'n/a' if alarms is None else f'{alarms:.1%}'}, {caught} detected {rates['detection_rate']:.1%}")
    for warning in calibration.warnings:
        say(f"warning: {warning}")


def _protected_paths(uri: str, search) -> tuple[Path, ...]:
    """What an export must never replace: automl-ad's working state, the search's folder, the dataset and a local
    SQLite tracking store."""
    paths = [Path.cwd() / STATE_DIR, Path(search.data)] + ([Path(search.work_dir)] if search.work_dir else [])
    if uri.startswith("sqlite:///"):
        paths.append(Path(uri[len("sqlite:///"):]))
    return tuple(paths)


def parity_images(validation, per_label: int = 3):
    """A few validation images, normal and anomalous, for the ONNX parity check (outputs with a real span)."""
    picks = [int(i) for label in (0, 1) for i in np.flatnonzero(validation.labels == label)[:per_label]]
    return validation.subset(picks)


@dataclass
class Export:
    """What :func:`export_model` produced."""

    path: Path
    trial: TrialRecord
    manifest: dict
    model_uri: str | None = None
    tracking_uri: str = ""


def export_model(out: str | Path, run_id: str | None = None, target: str | None = None, objective: str = "quality",
                 tracking_uri: str | None = None, far: float = DEFAULT_FALSE_ALARM_RATE, overwrite: bool = False,
                 mlflow: bool = False, say=print) -> Export:
    """The `export` command: trial ``run_id``, or the front member of search ``target`` (None: the newest) best for
    ``objective``, packaged at ``out``; with ``mlflow`` also logged as a servable MLflow model."""
    store = SearchStore(tracking_uri)
    trial = store.trial(run_id) if run_id else choose_run(store, target, objective, say)
    path = export_run(store, trial.run_id, out, far=far, overwrite=overwrite, say=say)
    model_uri = log_package(path, store.uri, trial.run_id) if mlflow else None
    return Export(path, trial, verify_package(path), model_uri, store.uri)
