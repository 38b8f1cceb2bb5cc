"""What benchmarks/search.py computes from a finished search: which trials to compare (best default, search's best,
synthetic choice), their scores on the search's test split (native and under anomalib's 256x256 protocol), the
anytime curve and its plot, and the anomalib rows read from anchor CSVs."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from automl_ad.data.io import resize_image
from automl_ad.defaults import DEFAULT_FALSE_ALARM_RATE
from automl_ad.deploy.thresholds import calibrate_image_threshold
from automl_ad.detectors import Detector
from automl_ad.errors import UsageError
from automl_ad.evaluation.metrics import evaluate, rates_at
from automl_ad.tracking.records import SearchRecord, SearchStore, TrialRecord

#: Side of the squashed square anomalib resizes images, maps and masks to (its default image_size).
ANOMALIB_SIDE = 256
#: anomalib models reported beside the search (lower-case names as in the anchor CSVs).
ANOMALIB_MODELS = ("patchcore", "padim")
#: Names a dataset may have in an anchor CSV.
ANCHOR_NAMES = {"bottle": ("bottle",), "magnetic_tile": ("magnetic_tile",), "ball_screw": ("ball_screw", "bsdata")}
#: Share of the budget at which the anytime curve is read ("best after 10% of the budget").
EARLY_SHARE = 0.1


def complete(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Full-fidelity trials that finished with every objective measured (status ok)."""
    return [t for t in trials if t.complete and t.quality is not None]


def chosen_trials(trials: list[TrialRecord]) -> dict[str, TrialRecord | None]:
    """The best default (highest validation quality among complete default configurations), the search's best
    (highest validation quality) and the synthetic choice (highest synthetic quality; ties go to the trial proposed
    first, since the synthetic ranking cannot tell them apart)."""
    done = complete(trials)
    defaults = [t for t in done if t.default_config]
    synthetic = sorted((t for t in done if "synthetic_quality" in t.metrics), key=_proposal_order)
    return {"best_default": max(defaults, key=lambda t: t.quality, default=None),
            "search_best": max(done, key=lambda t: t.quality, default=None),
            "synthetic_choice": max(synthetic, key=lambda t: t.metrics["synthetic_quality"], default=None)}


def _proposal_order(trial: TrialRecord):
    return (len(trial.trial), trial.trial)  # trial ids count up; shorter ids are older


def geometry_text(params: dict) -> str:
    """How a trial's model sees an image (from its parameters), as the search's live view names it
    (``squash-256x256`` unless the search changed it)."""
    from automl_ad.data.geometry import geometry_label

    return geometry_label(params) or f"squash-{ANOMALIB_SIDE}x{ANOMALIB_SIDE}"


def readable_geometry(text: str) -> str:
    """A geometry cell of a report written before geometries were named (a JSON object, "squash 256"), as its
    name."""
    if text.startswith("{"):
        return geometry_text({"geometry": json.loads(text)})
    return geometry_text({"input_size": int(text.split()[1])}) if text.startswith("squash ") else text


def nearest_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A binary mask squashed to side x side by nearest-neighbour interpolation (torchvision's mask resize, as in
    anomalib), then thresholded at 0.5."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(side, side), mode="nearest")[0, 0].numpy() > 0.5


def test_scores(store: SearchStore, search: SearchRecord, trial: TrialRecord, split,
                far: float = DEFAULT_FALSE_ALARM_RATE) -> dict:
    """Test metrics of the trial's saved model: ``native`` (maps and masks at the model's map size, as the
    library's exports report them) and ``anomalib`` (maps bilinearly and masks nearest-neighbour resized to
    256x256, anomalib's protocol); image AUROC does not depend on the maps, so it is the same in both.
    ``deployed``: the detection and false-alarm rates on the test images at the image threshold an export would
    calibrate on the held-out validation normals for false-alarm rate ``far`` (the test normals never set it;
    ``native["detection_at_far"]`` is the oracle rate at the test normals' own quantile)."""
    test = split.test
    if not len(test) or not test.labels.any():
        raise UsageError(f"the search {search.run_id} has no defective test images to score on")
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector.load(store.model_dir(trial, Path(tmp), search.work_dir))
        scores = detector.score_samples(test)
        threshold = calibrate_image_threshold(detector.score_samples(split.normal_validation()).image_scores, far)
    masks = test.masks()
    native = evaluate(test.labels, scores.image_scores, scores.anomaly_maps, masks, far=far)
    return {"n_test": len(test), "n_defective": int(test.labels.sum()), "native": native,
            "deployed": {"target_false_alarm_rate": far, "threshold": threshold.to_dict(),
                         **rates_at(threshold.value, test.labels, scores.image_scores)},
            "anomalib": anomalib_protocol(test.labels, scores.image_scores, scores.anomaly_maps, masks)}


def anomalib_protocol(labels, image_scores, maps, masks) -> dict:
    """Image AUROC, AUPRO and pixel AUROC under anomalib's protocol: maps bilinearly and masks nearest-neighbour
    squashed to 256x256."""
    maps = None if maps is None else [resize_image(m, ANOMALIB_SIDE) for m in maps]
    small_masks = [None if m is None else nearest_mask(m, ANOMALIB_SIDE) for m in masks]
    protocol = evaluate(labels, image_scores, maps, small_masks)
    return {key: protocol[key] for key in ("image_auroc", "aupro", "pixel_auroc")}


def trial_summary(trial: TrialRecord) -> dict:
    return {"run_id": trial.run_id, "trial": trial.trial, "family": trial.family,
            "geometry": geometry_text(trial.params), "default_config": trial.default_config, "quality": trial.quality,
            "synthetic_quality": trial.metrics.get("synthetic_quality"),
            "val_image_auroc": trial.metrics.get("val_image_auroc"), "val_aupro": trial.metrics.get("val_aupro")}


def trial_end_seconds(store: SearchStore, search: SearchRecord, trials: list[TrialRecord]) -> dict[str, float]:
    """Seconds from the search run's start to the end of each trial's run (when its record was written), for the
    trials whose run has an end time."""
    ends = {}
    for trial in trials:
        end = store.tracker.client.get_run(trial.run_id).info.end_time
        if end:
            ends[trial.run_id] = (end - search.start_time) / 1000.0
    return ends


def best_by(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """The anytime curve's best quality at ``seconds`` into the search (None before the first complete trial)."""
    values = [quality for at, quality in curve if at <= seconds]
    return values[-1] if values else None


def time_plot(curve: list[tuple[float, float]], dots: list[tuple[float, float, str]], default_quality: float | None,
              budget_s: float, path: Path, title: str) -> Path:
    """Best validation quality so far (a step line) against seconds into the search, every complete trial as a dot
    at its end time (colour = family), the best default's validation quality as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    families = sorted({family for _, _, family in dots})
    for i, family in enumerate(families):
        points = [(at, q) for at, q, f in dots if f == family]
        ax.scatter(*zip(*points), s=22, color=plt.cm.tab10(i % 10), alpha=0.75, label=family, zorder=3)
    if curve:
        times, qualities = zip(*curve)
        ax.step([*times, budget_s], [*qualities, qualities[-1]], where="post", color="black", lw=1.4,
                label="best so far", zorder=2)
    if default_quality is not None:
        ax.axhline(default_quality, color="tab:red", ls="--", lw=1, label="best default")
    ax.axvline(EARLY_SHARE * budget_s, color="grey", ls=":", lw=1, label=f"{EARLY_SHARE:.0%} of the budget")
    ax.set_xlim(0, budget_s * 1.02)
    ax.set_xlabel("seconds into the search")
    ax.set_ylabel("validation quality (real defects)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def anchor_sources(root: Path, shared: Path, extra: Path | None) -> list[Path]:
    """Anchor CSVs in order of preference: ``--anchor-csv``, the repository's side-by-side table, then the shared
    harness's results, newest first."""
    harness = sorted((shared / "tools" / "anomalib-anchor").glob("results-*.csv"), reverse=True)
    return [p for p in [extra, root / "reports" / "anchor-side-by-side.csv", *harness] if p is not None]


def anomalib_rows(dataset: str, sources: list[Path]) -> dict[str, dict | None]:
    """Per anomalib model, the first successful row for ``dataset`` in ``sources`` (image_AUROC, pixel_AUPRO, its
    settings and the file it came from); None where no file has one ("not run")."""
    found: dict[str, dict | None] = {model: None for model in ANOMALIB_MODELS}
    for source in sources:
        if not source.is_file():
            continue
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        missing = {"model", "dataset", "image_AUROC", "pixel_AUPRO"} - set(rows[0] if rows else {})
        if rows and missing:
            raise UsageError(f"{source} is not an anomalib anchor table: it lacks the column(s) "
                             f"{', '.join(sorted(missing))}")
        for row in rows:
            model = row["model"].strip().lower()
            if (model in found and found[model] is None and row["dataset"].strip() in ANCHOR_NAMES[dataset]
                    and row.get("status", "ok") == "ok" and row["image_AUROC"]):
                found[model] = {"image_auroc": float(row["image_AUROC"]),
                                "aupro": float(row["pixel_AUPRO"]) if row["pixel_AUPRO"] else None,
                                "settings": _settings(row.get("settings", "")), "source": str(source)}
    return found


def _settings(text: str) -> dict:
    """The few anchor settings worth showing (backbone, image size, layers, coreset ratio)."""
    try:
        settings = json.loads(text) if text else {}
    except ValueError:
        return {"raw": text}
    keys = ("anomalib", "backbone", "image_size", "layers", "coreset_sampling_ratio", "n_features", "threads")
    return {k: settings[k] for k in keys if k in settings}
