"""One search trial, run in its own process: fit, report intermediate quality, validate, measure cost, save.

``python -m automl_ad.search.trial SPEC.json`` prints JSON lines on stdout — ``{"event": "epoch", ...}`` while an
iterative family trains, then one ``{"event": "result", ...}`` (or ``{"event": "failed", ...}`` naming the
trial's own exception, type and message). A process that ends without either (killed, a native crash) is described
by :func:`unreported_failure` from its exit status and its stderr. A process per
trial keeps memory bounded over a long search (everything is freed when it exits), lets a timeout or an
out-of-memory kill end one trial without touching the others, and measures peak memory per configuration.
"""

from __future__ import annotations

import faulthandler
import json
import math
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.data.synthetic import KINDS, without_trained_kinds
from automl_ad.defaults import DEFAULT_FALSE_ALARM_RATE, SEARCH_TRAINING_SHARE

#: In a trial's folder: the Ray node (id, host) it ran on.
NODE_FILE = "node.json"


class TrialTimeout(Exception):
    """The trial ran past its time limit."""


def _emit(event: dict) -> None:
    print(json.dumps(event, default=float), flush=True)


def run_trial(spec: dict) -> dict:
    """Fit ``spec["family"]`` with ``spec["params"]`` and return the result event (see module docstring)."""
    import torch

    from automl_ad.detectors import create_detector
    from automl_ad.evaluation.metrics import evaluate
    from automl_ad.evaluation.run import measure_costs
    from automl_ad.features.cache import FEATURE_TIMES
    from automl_ad.features.runtime import SETUP_TIME
    from automl_ad.search.validation import PIXEL_CURVE_METRICS, quality, screening_validation

    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    data = json.loads(Path(spec["data_file"]).read_text())
    train, validation = ImageSet.from_json(data["train"]), ImageSet.from_json(data["validation"])
    train = training_subset(train, (spec.get("fidelity") or {}).get("train_images"))
    reference = ImageSet.from_json(data["reference"]) if data.get("reference") else None
    metric, limit = spec.get("metric", "combined"), float(spec.get("timeout_s", math.inf))
    far = float(spec.get("false_alarm_rate") or DEFAULT_FALSE_ALARM_RATE)
    pixel_curves = metric in PIXEL_CURVE_METRICS
    start = time.monotonic()
    setup_at_start, saved_at_start = SETUP_TIME.seconds, FEATURE_TIMES.saved_s
    deadline, training_deadline = start + limit, start + SEARCH_TRAINING_SHARE * limit
    detector = create_detector(spec["family"], **spec["params"])
    validation = without_trained_kinds(validation, detector.trains_on_anomalies)  # never ranked on its training kinds
    screened = screening_validation(validation) if (spec.get("fidelity") or {}).get("validation_images") else None
    if screened is not None:  # a screening rung is ranked on part of them
        validation = validation.subset(screened)
    every = max(1, int(spec.get("report_every", 1)))
    planned_epochs = getattr(detector, "epochs", None)
    cut, interim = {}, {"seconds": 0.0}  # interim: scoring the validation between epochs (part of the fit)

    def on_epoch(epoch: int, metrics: dict) -> bool:
        event = {"event": "epoch", "epoch": epoch + 1, "loss": metrics["loss"]}
        last = planned_epochs is not None and epoch + 1 >= int(planned_epochs)  # the final evaluation follows
        if "score" in metrics and (epoch + 1) % every == 0 and not last:
            scoring = time.monotonic()
            scores = metrics["score"](validation)
            event["quality"] = quality(evaluate(validation.labels, scores.image_scores, scores.anomaly_maps,
                                                validation.masks(), far=far,
                                                pixel_curves=pixel_curves), metric)
            interim["seconds"] += time.monotonic() - scoring
        _emit(event)
        if time.monotonic() > training_deadline:  # out of training time: evaluate what was learnt so far
            cut["epoch"] = epoch + 1
            return True
        return False

    detector.fit(train, on_epoch=on_epoch if detector.iterative else None, deadline=training_deadline)
    fitted_at = time.monotonic()
    setup_at_fit, saved_at_fit = SETUP_TIME.seconds, FEATURE_TIMES.saved_s
    if fitted_at > deadline:
        raise TrialTimeout(f"fit took {detector.fit_seconds_:.0f} s, past the per-trial limit of "
                           f"{spec['timeout_s']:.0f} s")
    scores = detector.score_samples(validation)
    network_s = time.monotonic() - fitted_at  # scoring and cost measurement run the network: they grow with pixels
    metrics = evaluate(validation.labels, scores.image_scores, scores.anomaly_maps, validation.masks(), far=far,
                       pixel_curves=pixel_curves)
    result = {"event": "result", "quality": quality(metrics, metric),
              **{f"val_{k}": v for k, v in metrics.items()}, **anomaly_kinds_used(validation)}
    if result["quality"] is None or not np.isfinite(result["quality"]):
        raise FloatingPointError(f"validation quality is {result['quality']} (metric {metric})")
    if reference is not None:
        ref = detector.score_samples(reference)
        ref_metrics = evaluate(reference.labels, ref.image_scores, ref.anomaly_maps, reference.masks(), far=far,
                               pixel_curves=pixel_curves)
        result.update({f"real_{k}": v for k, v in ref_metrics.items()}, real_quality=quality(ref_metrics, metric))
    measuring = time.monotonic()
    cost = measure_costs(detector, validation, repeats=int(spec.get("latency_repeats", 10)))
    network_s += time.monotonic() - measuring
    result.update(cost.to_dict())
    result["epochs_trained"] = detector.epochs_trained_
    result["training_cut_by_time"] = bool(cut) or detector.fit_cut_by_time_
    result["fit_extra_seconds"] = detector.fit_extra_seconds_
    result["train_images"] = len(train)
    result["val_normal_images"] = int(np.sum(validation.labels == 0))  # the validation's resolution (see
    result["val_anomalous_images"] = int(np.sum(validation.labels == 1))  # validation_resolution)
    result.update(FEATURE_TIMES.as_metrics())
    out = Path(spec["out_dir"])
    detector.save(out / "model")
    result["heatmaps"] = _heatmaps(validation, scores, out / "heatmaps")
    result["post_fit_seconds"] = time.monotonic() - fitted_at  # validation, cost measurement, saving
    # for the cost predictor: network set-up (not scaled with the work), the fit's interim scoring (grows with the
    # validation, not the training images), features the cache spared (work a later trial may have to do), the
    # post-fit seconds that grow with the network's pixels (the rest, metrics and saving, grows with the images)
    result.update(fit_setup_seconds=setup_at_fit - setup_at_start, interim_scoring_seconds=interim["seconds"],
                  post_fit_setup_seconds=SETUP_TIME.seconds - setup_at_fit,
                  post_fit_network_seconds=max(0.0, network_s - (SETUP_TIME.seconds - setup_at_fit)),
                  fit_cache_saved_seconds=saved_at_fit - saved_at_start,
                  post_fit_cache_saved_seconds=FEATURE_TIMES.saved_s - saved_at_fit)
    return result


def training_subset(train: ImageSet, count: int | None) -> ImageSet:
    """``count`` training images spread evenly over the set (a screening fidelity), or all of them. The same
    images for every trial of a rung, so screened trials compare and share cached features."""
    if not count or count >= len(train):
        return train
    return train.subset(np.linspace(0, len(train) - 1, int(count)).round().astype(int).tolist())


def anomaly_kinds_used(validation: ImageSet) -> dict[str, int]:
    """``val_anomalies_<kind>``: how many synthetic anomalies of each kind the trial was ranked on (0 for a kind
    its family trains on); empty when the validation anomalies are real."""
    if validation.kinds is None or all(kind is None for kind in validation.kinds):
        return {}
    return {f"val_anomalies_{kind}": validation.kinds.count(kind) for kind in KINDS}


def _heatmaps(images: ImageSet, scores, out: Path) -> list[str]:
    """Two overlays: the most anomalous-looking anomaly and normal image of the validation set."""
    if scores.anomaly_maps is None:
        return []
    from automl_ad.figures.heatmaps import save_overlays

    picked = [int(np.argmax(np.where(images.labels == k, scores.image_scores, -np.inf))) for k in (1, 0)
              if (images.labels == k).any()]
    subset = images.subset(picked)
    paths = save_overlays(out, subset.load_each(), scores.anomaly_maps[picked], subset.labels,
                          scores.image_scores[picked], [str(p) for p in subset.paths], subset.masks(), count=3)
    return [str(p) for p in paths]


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    faulthandler.enable()  # a native crash (segfault in a library) still leaves a "Fatal Python error" line
    try:
        _emit(run_trial(json.loads(Path((argv or sys.argv[1:])[0]).read_text())))
    except TrialTimeout as exc:
        _emit({"event": "failed", "reason": "timeout", "error": str(exc)})
    except MemoryError as exc:
        _emit({"event": "failed", "reason": "out of memory", "error": f"MemoryError: {exc}"})
    except Exception as exc:  # noqa: BLE001 - any failure of a configuration is a result the search records
        reason = "nan" if isinstance(exc, FloatingPointError) else type(exc).__name__
        if "out of memory" in str(exc).lower():
            reason = "out of memory"
        _emit({"event": "failed", "reason": reason, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=8)})
    return 0


def unreported_failure(returncode: int, stderr: str, time_limit_s: float | None = None) -> dict:
    """The failed event of a trial process that ended without reporting one.

    Its error is the last Python error in ``stderr`` (a traceback's final line or a "Fatal Python error" line),
    never whatever a library last printed (a warning about unexpected weight keys, say); else how it exited.
    ``time_limit_s`` is set when the process was killed for running past that hard limit.
    """
    if returncode < 0:
        try:
            exit_text = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            exit_text = f"killed by signal {-returncode}"
    else:
        exit_text = f"exit code {returncode}"
    if time_limit_s is not None:
        return {"event": "failed", "reason": "timeout",
                "error": f"{exit_text} after the hard time limit of {time_limit_s:.0f} s"}
    error = last_python_error(stderr)
    reason = "killed (out of memory?)" if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) else "crashed"
    return {"event": "failed", "reason": reason,
            "error": f"{exit_text}: {error}" if error else f"{exit_text}, without a Python error"}


def last_python_error(text: str) -> str | None:
    """The exception line ending the last traceback in ``text``, or its last "Fatal Python error" line."""
    error, in_traceback = None, False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif line.startswith("Fatal Python error:") or (in_traceback and line.strip() and not line[0].isspace()):
            error, in_traceback = line.strip(), False
    return error


if __name__ == "__main__":
    sys.exit(main())
