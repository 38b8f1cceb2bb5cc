"""One self-contained HTML file about a search: what the data is, what was recommended and why, what the search
tried, and how the best model behaves on the test images it never saw during selection.

Everything is read back from the MLflow store (the search's parent run, its trials, the profile and
recommendation logged with it); the best Pareto-front model is reloaded and scored on the test split, with the
image threshold calibrated on held-out validation normals exactly as ``automl-ad export`` does. Figures are
matplotlib PNGs embedded as base64; the CSS is inline; the file references nothing outside itself. A section
whose inputs are missing says why instead of failing the report. Figures are rounded for reading
(:mod:`automl_ad.reporting.rounding`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automl_ad.data import open_dataset
from automl_ad.data.io import resize_image
from automl_ad.data.split import ANOMALY_WORDS
from automl_ad.defaults import DEFAULT_FALSE_ALARM_RATE
from automl_ad.deploy.export import calibrate, choose_run
from automl_ad.detectors import Detector, detector_class
from automl_ad.errors import InvalidDatasetError, UsageError
from automl_ad.evaluation.metrics import evaluate, rates_at
from automl_ad.evaluation.objectives import OBJECTIVES, pareto_ranks
from automl_ad.evaluation.selection import selection_agreement
from automl_ad.figures.heatmaps import overlay
from automl_ad.figures.plots import pareto_plot
from automl_ad.profiling import profile_dataset
from automl_ad.reporting.rounding import duration, rounded
from automl_ad.tracking.records import SearchRecord, SearchStore
from automl_ad.version import __version__

log = logging.getLogger(__name__)

#: Section ids (stable: tests and links rely on them) and titles, in report order.
SECTIONS = (("profile", "Dataset profile"), ("recommendation", "Recommendation"), ("trials", "Trials"),
            ("pareto", "Pareto front"), ("best-per-family", "Best configuration per family"),
            ("scores", "Test scores and threshold"), ("operating", "Operating curve"),
            ("curves", "ROC and precision-recall curves"), ("gallery", "Heatmap gallery"))
MAX_TEST_IMAGES = 200
#: The start of every report's title: how an existing file is known as a report that may be replaced.
REPORT_TITLE = "automl-ad report"
GALLERY_PER_KIND = 4
THUMBNAIL_SIDE = 192
_NORMAL, _DEFECT = "#3b7dd8", "#d8453b"


# --- gathering ----------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The best front model scored on (at most ``MAX_TEST_IMAGES``) test images; ``missing`` says why not."""

    missing: str | None = None
    run_id: str = ""
    family: str = ""
    threshold: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    maps: np.ndarray | None = None
    images: object = None  # the scored test ImageSet
    names: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    n_test: int = 0
    note: str = ""
    #: From the calibration on validation (as export): the threshold table and the rates at the threshold.
    operating_points: list[dict] = field(default_factory=list)
    validation_rates: dict = field(default_factory=dict)
    validation_kind: str = ""
    #: What was scored: "test" images, or "validation" ones when the split holds no test images.
    scored_on: str = "test"


@dataclass
class SearchFacts:
    search: SearchRecord
    trials: list[dict]
    profile: dict | None
    profile_note: str
    recommendation: dict | None
    search_space: dict | None
    screen: dict | None = None  # recommend's screen of the good images, when it ran

    @property
    def experiment(self) -> str:
        return self.search.experiment

    @property
    def params(self) -> dict:
        return self.search.params


def gather(store: SearchStore, search: SearchRecord) -> SearchFacts:
    """The search, its trials (as table rows) and the JSON artifacts logged with it."""
    trials = [t.row() for t in store.trials(search.run_id)]
    profile = _artifact_json(store, search.run_id, "search/profile.json")
    recommendation = _artifact_json(store, search.run_id, "search/recommendation.json")
    space = _artifact_json(store, search.run_id, "search/search_space.json")
    screen = _artifact_json(store, search.run_id, "search/screen.json")
    note = "profile logged with the search (from `automl-ad recommend`)"
    if profile is None:
        profile, note = _profile_now(search.data)
    return SearchFacts(search, trials, profile, note, recommendation, space, screen)


def _artifact_json(store: SearchStore, run_id: str, path: str) -> dict | None:
    try:
        return store.artifact_json(run_id, path)
    except Exception as exc:  # noqa: BLE001 - a damaged or unreachable artifact only blanks its section
        log.warning("could not read artifact %s of run %s: %s", path, run_id, exc)
        return None


def _profile_now(data: str | None) -> tuple[dict | None, str]:
    """The search ran without `automl-ad recommend`: profile the dataset now, when it is still there."""
    if not data or not Path(data).is_dir():
        return None, (f"No profile was logged with this search (it ran without `automl-ad recommend`) and the "
                      f"dataset {data} is not on this machine to profile it now.")
    try:

        return profile_dataset(open_dataset(data)).to_dict(), ("No profile was logged with this search (it ran "
                                                               "without `automl-ad recommend`); profiled now.")
    except Exception as exc:  # noqa: BLE001 - the rest of the report is still worth having
        return None, f"No profile was logged with this search and profiling {data} now failed: {exc}"


def best_front_trial(store: SearchStore, search: SearchRecord, trials: list[dict]) -> dict | None:
    """The trial ``export --best`` takes: the Pareto-front trial with the highest validation quality among those
    meeting the search's deployment limits (its model is logged)."""
    try:
        chosen = choose_run(store, search.run_id, "quality").run_id
    except UsageError:  # no complete trial on the front
        return None
    return next(t for t in trials if t["run_id"] == chosen)


def _cap(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` images, normal/defective proportions kept (at least one of each class)."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_bad = min(len(bad), max(1 if len(bad) else 0, int(round(limit * len(bad) / n))))
    n_good = min(len(good), limit - n_bad)
    picked = np.concatenate([rng.choice(bad, n_bad, replace=False), rng.choice(good, n_good, replace=False)])
    return np.sort(picked.astype(int))


def evaluate_best(store: SearchStore, facts: SearchFacts, max_images: int = MAX_TEST_IMAGES,
                  far: float = DEFAULT_FALSE_ALARM_RATE, say=print) -> Evaluation:
    """Score the best front model on the test split; thresholds calibrated as export does."""
    best = best_front_trial(store, facts.search, facts.trials)
    if best is None:
        return Evaluation("The search has no completed trial on its Pareto front, so there is no model to score.")
    seed = facts.search.seed
    try:
        split = store.split(facts.search, check=True, say=say)  # as export: the images the search used
        with tempfile.TemporaryDirectory() as tmp:
            detector = Detector.load(store.model_dir(store.trial(best["run_id"]), Path(tmp), facts.search.work_dir))
        calibration = calibrate(detector, split, far, say)  # as export: without the family's own anomaly kinds
    except (UsageError, InvalidDatasetError, ValueError, OSError) as exc:
        return Evaluation(f"The best front model ({best['family']}, run {best['run_id']}) could not be reloaded "
                          f"and calibrated: {exc}", best["run_id"], best["family"])
    missing = [p for p in split.test.paths if not Path(p).is_file()]
    if missing:
        return Evaluation(f"{len(missing)} of the test images are not on this machine (e.g. {missing[0]}), so the "
                          "test split cannot be scored.", best["run_id"], best["family"])
    result = Evaluation(None, best["run_id"], best["family"], calibration.thresholds["image"], n_test=len(split.test),
                        operating_points=calibration.operating_points,
                        validation_rates=calibration.validation_rates, validation_kind=split.validation_kind)
    scored = split.test
    if not len(scored):  # e.g. a few normals without labelled defects: they trained instead
        scored, result.scored_on = split.validation_for(detector.trains_on_anomalies), "validation"
        result.note = ("The search's split holds no test images, so these figures are on the validation images. "
                       "They selected this model, so the figures flatter it.")
    keep = _cap(scored.labels, max_images, seed)
    test = scored.subset(keep)
    if len(keep) < len(scored):
        result.note = (f"{result.note} {len(keep)} of the {len(scored)} {result.scored_on} images scored (a "
                       f"stratified random sample, seed {seed}), to keep the report quick.").strip()
    say(f"Scoring {len(test)} {result.scored_on} images"
        f"{' (never used for selection)' if result.scored_on == 'test' else ' (the split holds no test images)'} ...")
    scores = detector.score_samples(test)
    result.labels, result.scores, result.maps = test.labels, scores.image_scores, scores.anomaly_maps
    result.images = test
    result.names = [_short_name(p, Path(facts.search.data)) for p in test.paths]
    if test.labels.any():
        result.metrics = evaluate(test.labels, scores.image_scores, scores.anomaly_maps, test.masks())
    return result


def _short_name(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


# --- figures ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _plt().close(fig)
    return _data_uri(buffer.getvalue())


def pareto_figure(trials: list[dict]) -> str | None:
    done = [t for t in trials if t.get("status") == "ok" and all(k in t for k, _ in OBJECTIVES)]
    if not done:
        return None
    ranks = pareto_ranks(np.array([[t[k] for k, _ in OBJECTIVES] for t in done]), [d for _, d in OBJECTIVES])
    with tempfile.TemporaryDirectory() as tmp:
        path = pareto_plot(done, ranks, Path(tmp) / "pareto.png", title=f"{len(done)} completed trials")
        return _data_uri(path.read_bytes())


def histogram_figure(ev: Evaluation) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    scores, labels, limit = ev.scores, ev.labels, ev.threshold["value"]
    edges = np.histogram_bin_edges(np.append(scores, limit), bins=min(40, max(20, len(scores) // 4)))
    for label, colour, name in ((0, _NORMAL, "normal"), (1, _DEFECT, "defective")):
        part = scores[labels == label]
        if len(part):
            ax.hist(part, bins=edges, color=colour, alpha=0.55, label=f"{name} ({len(part)})")
    ax.axvline(limit, color="black", ls="--", lw=1.4,
               label=f"threshold {limit:.4g} ({ev.threshold['method']}, target false-alarm rate "
                     f"{ev.threshold['target_false_alarm_rate']:g})")
    ax.set_xlabel("image anomaly score")
    ax.set_ylabel(f"{ev.scored_on} images")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_uri(fig)


def curves_figure(ev: Evaluation) -> str:
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    plt = _plt()
    labels, scores, limit = ev.labels, ev.scores, ev.threshold["value"]
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    predicted = scores > limit
    op_fpr = float(predicted[labels == 0].mean()) if (labels == 0).any() else 0.0
    op_tpr = float(predicted[labels == 1].mean())
    op_precision = float(labels[predicted].mean()) if predicted.any() else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(fpr, tpr, color=_DEFECT, lw=1.8, label=f"ROC (AUC {auc(fpr, tpr):.3f})")
    left.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    left.plot([op_fpr], [op_tpr], "ko", label="calibrated threshold")
    left.set_xlabel("false-positive rate")
    left.set_ylabel("true-positive rate")
    left.set_title("ROC, image level")
    right.plot(recall, precision, color=_NORMAL, lw=1.8,
               label=f"PR (AP {average_precision_score(labels, scores):.3f})")
    right.axhline(labels.mean(), color="grey", ls=":", lw=1, label=f"chance ({labels.mean():.2f})")
    right.plot([op_tpr], [op_precision], "ko", label="calibrated threshold")
    right.set_xlabel("recall")
    right.set_ylabel("precision")
    right.set_title("Precision-recall, image level")
    for ax in (left, right):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is left else "lower left")
    fig.tight_layout()
    return _figure_uri(fig)


#: Symmetric-log scale of the operating curve: linear below this false-alarm rate (so 0 is drawn), logarithmic above.
_FAR_LINEAR_BELOW = 1e-3


def _anomaly_words(ev) -> str:
    """What the validation anomalies were, in words."""
    return ANOMALY_WORDS.get(ev.validation_kind, f"{ev.validation_kind} anomalies")


def operating_figure(ev: Evaluation) -> str:
    """Detection rate against false-alarm rate (log scale, where deployments operate) on the test images, with the
    calibrated threshold, the target rate and the validation threshold table."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    labels, scores, th = ev.labels, ev.scores, ev.threshold
    at = rates_at(th["value"], labels, scores)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color=_DEFECT, lw=1.8,
                label=f"{ev.scored_on}: every threshold ({int(labels.sum())} defective, "
                      f"{int((labels == 0).sum())} normal)")
    table = [r for r in ev.operating_points if r.get("detection_rate") is not None]
    if table:
        ax.plot([r["false_alarm_rate"] for r in table], [r["detection_rate"] for r in table], "s--", color=_NORMAL,
                lw=1, ms=5, label=f"validation ({_anomaly_words(ev)}): the package's threshold table")
    if ev.validation_rates.get("detection_rate") is not None:
        ax.plot([ev.validation_rates["false_alarm_rate"]], [ev.validation_rates["detection_rate"]], "o", ms=9,
                mfc="white", mec="black", label="calibrated threshold on validation")
    if at["detection_rate"] is not None:
        ax.plot([at["false_alarm_rate"]], [at["detection_rate"]], "ko", ms=8,
                label=f"calibrated threshold on {ev.scored_on}: false alarms {rounded(at['false_alarm_rate'])}, "
                      f"detected {rounded(at['detection_rate'])}")
    ax.axvline(th["target_false_alarm_rate"], color="grey", ls=":", lw=1.2,
               label=f"target false-alarm rate {th['target_false_alarm_rate']:g}")
    ax.set_xscale("symlog", linthresh=_FAR_LINEAR_BELOW)
    ticks = [0, 0.001, 0.01, 0.1, 1]
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("false-alarm rate (share of normal images flagged; log scale above 0.001)")
    ax.set_ylabel("detection rate (share of defective images flagged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _figure_uri(fig)


def _thumbnail(ev: Evaluation, index: int, vmin: float, vmax: float) -> str:
    from PIL import Image


    one = ev.images.subset([index])
    if ev.maps is not None:
        image = one.load(ev.maps.shape[1:])[0]
        picture = overlay(image, ev.maps[index], vmin, vmax, one.masks()[0])
    else:
        picture = (one.load(THUMBNAIL_SIDE)[0] * 255).astype(np.uint8)
        mask = one.masks()[0]
        if mask is not None:
            from scipy import ndimage


            inside = resize_image(mask.astype(np.float32), picture.shape[:2]) > 0.5
            picture[inside ^ ndimage.binary_erosion(inside, iterations=2)] = 255
    thumb = Image.fromarray(picture)
    if max(thumb.size) != THUMBNAIL_SIDE:
        thumb = thumb.resize((THUMBNAIL_SIDE, round(THUMBNAIL_SIDE * thumb.height / thumb.width)),
                             Image.NEAREST if max(thumb.size) < THUMBNAIL_SIDE else Image.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue())


def gallery_groups(ev: Evaluation, per_kind: int = GALLERY_PER_KIND) -> list[tuple[str, str, list[int]]]:
    """(title, explanation, test indices) for true/false positives/negatives at the calibrated threshold."""
    scores, labels, limit = ev.scores, ev.labels, ev.threshold["value"]
    flagged = scores > limit
    order = np.argsort(-scores)  # most anomalous first
    pick = lambda cond, rev=False: [int(i) for i in (order[::-1] if rev else order) if cond[i]][:per_kind]  # noqa: E731
    return [
        ("True positives", "defective, flagged (highest scores)", pick(flagged & (labels == 1))),
        ("False negatives", "defective, missed (lowest scores: the worst misses)",
         pick(~flagged & (labels == 1), True)),
        ("False positives", "normal, flagged (highest scores: the worst false alarms)", pick(flagged & (labels == 0))),
        ("True negatives", "normal, passed (highest scores: the closest calls)", pick(~flagged & (labels == 0))),
    ]


# --- HTML ---------------------------------------------------------------------------------------------------------
CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2330;
background:#f4f5f7;margin:0}
header{background:#1d2a44;color:#fff;padding:22px 32px 16px}
header h1{margin:0 0 6px;font-size:24px;font-weight:600}
header .sub{color:#c9d3e6;font-size:13px}
nav{background:#26365a;padding:8px 32px;position:sticky;top:0;z-index:2}
nav a{color:#dfe7f7;text-decoration:none;margin-right:18px;font-size:13px;white-space:nowrap}
main{max-width:1240px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:16px 22px 20px;margin:18px 0}
h2{font-size:19px;margin:0 0 12px;color:#1d2a44;border-bottom:2px solid #e6e9ef;padding-bottom:6px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:6px 0}
th,td{border-bottom:1px solid #e6e9ef;padding:5px 7px;text-align:left;vertical-align:top}
th{background:#f0f2f6;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.params{font-family:"DejaVu Sans Mono",Consolas,monospace;font-size:11px;color:#3a4357;max-width:420px;
word-break:break-word}
tr.front td{background:#f3f8ee}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:6px 22px;margin:4px 0 8px}
.kv div{display:flex;justify-content:space-between;border-bottom:1px dotted #d5d9e1;padding:2px 0;gap:10px}
.kv span:first-child{color:#5a6375}
.kv span:last-child{font-weight:600;text-align:right}
.cfg{grid-template-columns:repeat(auto-fill,minmax(250px,1fr));margin-top:2px}
.cfglabel{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#8a91a0;margin-top:10px}
.cfg span:last-child{font:11.5px "DejaVu Sans Mono",Consolas,monospace;font-weight:400;word-break:break-all}
.cfg div.set,.setkey{background:#e8f0fc}.cfg div.set span:last-child{font-weight:700;color:#204a8a}
.note{background:#fff8e5;border-left:4px solid #e5b53b;padding:8px 12px;margin:8px 0;color:#4d4020}
.muted{color:#6b7385;font-size:12.5px}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:11px;font-weight:600}
.ok{background:#dff3df;color:#25602a}.failed{background:#fbe0de;color:#8a2a22}.stopped{background:#eceef2;color:#4a5263}
.short{background:#dbe8fb;color:#204a8a}.excl{background:#eceef2;color:#6b7385}
ul.reasons{margin:0;padding-left:16px}ul.reasons li{margin:1px 0}
.pro li::marker{content:"+ ";color:#25602a;font-weight:700}
.con li::marker{content:"\\2212  ";color:#8a2a22;font-weight:700}
img.figure{max-width:100%;height:auto;display:block;margin:8px auto;border:1px solid #eef0f4}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fafbfc;border:1px solid #e3e6ec;border-radius:6px;padding:6px;text-align:center}
figure img{width:192px;height:auto;image-rendering:pixelated;display:block;margin:0 auto}
figcaption{font-size:11.5px;color:#3a4357;margin-top:4px;word-break:break-all}
.stats{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.stat{background:#f4f6fa;border:1px solid #e0e4eb;border-radius:6px;padding:7px 14px;min-width:130px}
.stat b{display:block;font-size:18px;color:#1d2a44}.stat span{font-size:11.5px;color:#5a6375}
footer{text-align:center;color:#8a91a0;font-size:12px;padding:10px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return _e(value)


def _kv(pairs: list[tuple[str, object]]) -> str:
    cells = "".join(f"<div><span>{_e(k)}</span><span>{_e(v)}</span></div>" for k, v in pairs if v is not None)
    return f'<div class="kv">{cells}</div>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), row_classes=None) -> str:
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{cls}>" + "".join(
            cell if cell.startswith("<td") else (f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>")
            for i, cell in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _param_value(value) -> str:
    """A logged parameter for reading: floats to 4 significant digits (the search samples 0.08907580502211024)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if any(c in text for c in ".eE") and not text.lower().startswith(("n", "i")):
        try:
            return f"{float(text):.4g}"
        except ValueError:
            pass
    return text


def _params_text(params: dict, limit: int = 400) -> str:
    shown = {k: v for k, v in params.items() if k not in ("device", "weights")}
    text = ", ".join(f"{k}={_param_value(v)}" for k, v in sorted(shown.items()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _status_badge(status: str | None) -> str:
    cls = {"ok": "ok", "failed": "failed"}.get(status or "", "stopped")
    return f'<span class="badge {cls}">{_e(status or "?")}</span>'


def profile_section(facts: SearchFacts) -> str:
    params = facts.params
    split = (f"<p>Search split: <b>{_e(params.get('split'))}</b>; trials ranked on "
             f"<b>{_e(params.get('validation'))}</b> validation anomalies.</p>")
    p = facts.profile
    if p is None:
        return _note(facts.profile_note) + split
    c, s, col, st, al, d = (p.get(k) or {} for k in ("counts", "size", "color", "structure", "alignment", "defects"))
    size = (f"{s.get('width_median', 0):g} × {s.get('height_median', 0):g}" if s.get("distinct_sizes") == 1 else
            f"{s.get('distinct_sizes')} sizes, {s.get('width_min')}–{s.get('width_max')} × "
            f"{s.get('height_min')}–{s.get('height_max')}")
    abnormal = c.get("abnormal") or {}
    pairs = [("category", p.get("name")), ("layout", p.get("layout")),
             ("normal images (train / test / unsplit)",
              f"{c.get('normal_train')} / {c.get('normal_test')} / {c.get('normal_unsplit')}"),
             ("defective images", f"{sum(abnormal.values())}" + (f" in {len(abnormal)} types" if abnormal else "")),
             ("defect types", ", ".join(f"{k} {v}" for k, v in abnormal.items()) or "none"),
             ("masks", c.get("masks")), ("skipped files", c.get("skipped_files")),
             ("image size", size), ("colour", col.get("mode")),
             ("structure", f"{st.get('kind')} (confidence {_num(st.get('confidence'), 2)})"),
             ("periodic texture", st.get("periodic")),
             ("alignment score", _num(al.get("score"), 3)),
             ("template / per-position viable", f"{al.get('template_viable')} / {al.get('per_position_viable')}")]
    if d:
        pairs += [("defect area (median of image)", f"{100 * d.get('area_fraction_median', 0):.2f} %"),
                  ("defect area (min – max)", f"{100 * d.get('area_fraction_min', 0):.2f} – "
                                              f"{100 * d.get('area_fraction_max', 0):.2f} %"),
                  ("small defects (< 1 % of image)", f"{100 * d.get('small_defect_share', 0):.0f} %")]
    if p.get("overrides"):
        pairs.append(("declared facts (overrides)", json.dumps(p["overrides"])))
    shortcuts = "".join(_note(f"Warning: {text}. Validation and test scores may reward that, not the defect.")
                        for text in p.get("shortcuts") or [])
    return (shortcuts + _kv(pairs) + split
            + f'<p class="muted">{_e(facts.profile_note)}; root {_e(p.get("root"))}</p>' + screen_part(facts))


def screen_part(facts: SearchFacts, shown: int = GALLERY_PER_KIND) -> str:
    """recommend's screen of the good images: how many it named, and the first of them as pictures."""
    screen = facts.screen
    if not screen or screen.get("skipped") or screen.get("fence") is None:
        return ""
    suspects, root = screen.get("suspects") or [], Path(facts.params.get("data") or "/")
    head = (f"<h3>Good images that look unlike the others</h3><p>recommend's screen ({_e(screen.get('family'))}, "
            f"each of {_e(screen.get('folds'))} folds scored by a model fitted on the others) named "
            f"<b>{len(suspects)}</b> of the {len(screen.get('scores') or [])} good training images: out-of-fold "
            f"score above {_num(screen['fence'], 3)}. The search trained on them as normal; a defective one belongs "
            "in a defect folder.</p>")
    cells = []
    for item in suspects[:shown]:
        picture = _file_thumbnail(Path(item["image"]))
        name = _short_name(Path(item["image"]), root)
        image = f"<img alt='{_e(name)}' src='{picture}'>" if picture else ""
        cells.append(f"<figure>{image}"
                     f"<figcaption>{_e(name)}<br>score <b>{float(item['score']):.4g}</b>"
                     f"{'' if picture else ' (file not here)'}</figcaption></figure>")
    return head + (f'<div class="gallery">{"".join(cells)}</div>' if cells else "")


def _file_thumbnail(path: Path) -> str | None:
    """An image file as a PNG data URI at most THUMBNAIL_SIDE wide, or None when it cannot be read here."""
    from PIL import Image

    from automl_ad.data.io import ImageReadError, read_image, to_float

    try:
        picture = (to_float(read_image(path)) * 255).astype(np.uint8)
    except (OSError, ValueError, ImageReadError):
        return None
    thumb = Image.fromarray(picture)
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue())


def recommendation_section(facts: SearchFacts) -> str:
    families = facts.params.get("families", "[]")
    try:
        families = ", ".join(json.loads(families))
    except (TypeError, ValueError):
        pass
    searched = f'<p>Families searched: <b>{_e(families)}</b>.</p>'
    rec = facts.recommendation
    if rec is None:
        return searched + _note("No recommendation was logged with this search: it ran with explicit --families, "
                                "without `automl-ad recommend` first.")
    candidates = rec.get("candidates", [])
    ranked = [c for c in candidates if not c.get("excluded")]
    excluded = [c for c in candidates if c.get("excluded")]
    rows = []
    for i, cand in enumerate(ranked, 1):
        badge = ' <span class="badge short">shortlisted</span>' if cand.get("shortlisted") else ""
        pro = "".join(f"<li>{_e(r)}</li>" for r in cand.get("reasons_for", []))
        con = "".join(f"<li>{_e(r)}</li>" for r in cand.get("reasons_against", []))
        rows.append([str(i), f"<b>{_e(cand.get('name'))}</b>{badge}<br><span class='muted'>{_e(cand.get('route'))}; "
                             f"{_e(', '.join(cand.get('families', [])) or 'no searchable family')}</span>",
                     _num(cand.get("score"), 3), _num(cand.get("confidence"), 2),
                     f'<ul class="reasons pro">{pro}</ul>' if pro else "",
                     f'<ul class="reasons con">{con}</ul>' if con else ""])
    table = _table(["#", "route", "score", "confidence", "reasons for", "reasons against"], rows, {2, 3},
                   ["front" if c.get("shortlisted") else "" for c in ranked])
    scenario = rec.get("scenario") or {}
    situation = ", ".join(f"{k} {scenario[k]}" for k in ("complexity", "normals", "abnormals", "supervised")
                          if k in scenario)
    out = [searched, f"<p>Shortlist: <b>{_e(', '.join(rec.get('shortlist', [])) or 'none')}</b> (constraints "
                     f"{_e(rec.get('constraints'))}). Scenario: <b>{_e(scenario.get('anomaly_detection', '?'))}</b>"
                     + (f" ({_e(situation)})" if situation else "") + ".</p>", table]
    if excluded:
        items = "".join(f"<li><b>{_e(c.get('name'))}</b>: "
                        f"{_e('; '.join(c.get('reasons_against', [])) or 'excluded')}</li>" for c in excluded)
        out.append(f"<h3>Excluded routes ({len(excluded)})</h3><ul class='reasons'>{items}</ul>")
    return "".join(out)


def _one_decimal(value) -> str:
    return rounded(value, 1)


#: Trial table columns: (trial key, title, how a value is shown).
_TRIAL_COLUMNS = (("quality", "quality", rounded), ("throughput", "img/s", _one_decimal),
                  ("memory_mb", "memory MB", lambda v: rounded(v, 0)), ("latency_ms_p50", "p50 ms", _one_decimal),
                  ("fit_seconds", "fit", duration), ("model_mb", "model MB", _one_decimal))
#: Shown after quality when the trials were also scored on real defects while ranked on synthetic anomalies.
_REAL_COLUMN = ("real_quality", "real quality", rounded)


def _shown(value, show) -> str:
    """A table cell: ``show(value)``, or a dash when the value is missing."""
    text = show(value) if value is not None else "n/a"
    return "–" if text == "n/a" else _e(text)


def agreement_text(trials: list[dict]) -> str | None:
    """What ranking on synthetic anomalies cost, when the trials were also scored on real validation defects:
    Spearman correlation of the two rankings and the regret of the synthetic choice (None otherwise)."""
    done = [t for t in trials if t.get("status") == "ok" and t.get("quality") is not None
            and t.get("real_quality") is not None]
    if not done:
        return None
    agreement = selection_agreement([t["quality"] for t in done], [t["real_quality"] for t in done])
    chosen = max(done, key=lambda t: t["quality"])
    best = max(done, key=lambda t: t["real_quality"])
    rho = ("n/a (fewer than 3 trials, or a constant ranking)" if agreement.spearman is None
           else rounded(agreement.spearman))
    return (f"Synthetic vs real: the {agreement.n_trials} complete trials were also scored on the real validation "
            f"defects. Spearman rank correlation of synthetic and real quality {rho}; regret of choosing on synthetic "
            f"anomalies {rounded(agreement.regret)} (the synthetic choice, {chosen.get('family')}, reaches "
            f"{rounded(chosen['real_quality'])} on the real defects; the best there, {best.get('family')}, "
            f"{rounded(best['real_quality'])}). Measured on real validation defects: test scores are computed only "
            "for the exported model.")


def kinds_text(trials: list[dict]) -> str | None:
    """Which synthetic anomaly kinds each family was ranked on (its ``val_anomalies_<kind>`` counts)."""
    used: dict[str, set[str]] = {}
    for t in trials:
        for key, value in t.items():
            if key.startswith("val_anomalies_") and value:
                used.setdefault(t.get("family", "?"), set()).add(key[len("val_anomalies_"):])
    if not used:
        return None
    return ("Each family is ranked only on synthetic anomaly kinds it does not train on: "
            + "; ".join(f"{family}: {', '.join(sorted(kinds))}" for family, kinds in sorted(used.items())) + ".")


def trials_section(facts: SearchFacts) -> str:
    trials = facts.trials
    if not trials:
        return _note("The search recorded no trial.")
    counts = {}
    for t in trials:
        counts[t.get("status", "?")] = counts.get(t.get("status", "?"), 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    columns = list(_TRIAL_COLUMNS)
    if any(t.get("real_quality") is not None for t in trials):
        columns.insert(1, _REAL_COLUMN)
    rows, classes = [], []
    for t in trials:
        reason, error = t.get("failure_reason") or "", _e((t.get("error") or "")[:1500])
        rows.append([_e(t.get("trial")), _e(t.get("family")) + (" <span class='muted'>(default)</span>"
                                                               if t.get("default_config") else ""),
                     _status_badge(t.get("status"))
                     + (f"<br><span class='muted' title='{error}'>{_e(reason[:120])}</span>" if reason else ""),
                     *[_shown(t.get(key), show) for key, _, show in columns],
                     _num(t.get("pareto_rank")),
                     '<td class="params">' + ("" if not t.get("default_config") else
                                              '<span class="muted">family defaults</span> ')
                     + f'{_e(_params_text(t["params"]))}</td>'])
        classes.append("front" if t.get("pareto_rank") == 0 else "")
    headers = ["trial", "family", "status", *[title for _, title, _ in columns], "Pareto rank", "parameters"]
    metric = facts.params.get("metric", "combined")
    notes = "".join(f"<p>{_e(text)}</p>" for text in (kinds_text(trials), agreement_text(trials)) if text)
    return (f"<p>{len(trials)} trials: {_e(summary)}. Quality = validation <b>{_e(metric)}</b> on "
            f"{_e(facts.params.get('validation'))} anomalies; Pareto-front rows are shaded. Best quality "
            "first, failed trials last.</p>" + notes
            + _table(headers, rows, set(range(3, 3 + len(columns) + 1)), classes))


def pareto_section(facts: SearchFacts) -> str:
    uri = pareto_figure(facts.trials)
    if uri is None:
        return _note("No completed trial has all three objectives (quality, throughput, memory): nothing to plot.")
    front = [t for t in facts.trials if t.get("pareto_rank") == 0]
    return (f"<p>The search trades validation quality (↑), throughput (↑) and peak scoring memory (↓). "
            f"{len(front)} trial(s) are on the Pareto front: no other trial is at least as good on all three and "
            f"better on one.</p><img class='figure' alt='Pareto plot' src='{uri}'>")


def _family_defaults(family: str) -> dict:
    try:

        return {k: v for k, v in detector_class(family)().get_params().items() if k not in ("device", "weights")}
    except Exception:  # noqa: BLE001 - a family no longer registered: show what was logged
        return {}


def best_per_family_section(facts: SearchFacts) -> str:
    families = sorted({t.get("family") for t in facts.trials if t.get("family")})
    if not families:
        return _note("No trial recorded.")
    parts = ["<p class='muted'>Configuration of each family's best completed trial (highest validation quality). "
             "<span class='setkey'>Highlighted</span> parameters were set by the search; the others are the family's "
             "defaults.</p>"]
    for family in families:
        done = [t for t in facts.trials if t.get("family") == family and t.get("status") == "ok" and "quality" in t]
        tried = sum(t.get("family") == family for t in facts.trials)
        if not done:
            reasons = sorted({t.get("failure_reason") or t.get("status") or "?" for t in facts.trials
                              if t.get("family") == family})
            parts.append(f"<h3>{_e(family)}</h3>"
                         + _note(f"No completed trial out of {tried}: {'; '.join(reasons)[:300]}"))
            continue
        best = max(done, key=lambda t: t["quality"])
        front = " <span class='badge short'>Pareto front</span>" if best.get("pareto_rank") == 0 else ""
        config = {**_family_defaults(family), **best["params"]}
        cells = "".join(f"<div{' class=set' if k in best['params'] else ''}><span>{_e(k)}</span>"
                        f"<span>{_e(_param_value(v))}</span></div>" for k, v in sorted(config.items()))
        parts.append(
            f"<h3>{_e(family)}{front}</h3><p class='muted'>best of {len(done)} completed / {tried} trials; trial "
            f"{_e(best.get('trial'))}, run {_e(best['run_id'])}</p>"
            + _kv([("quality", rounded(best.get("quality"))),
                   ("throughput img/s", _one_decimal(best.get("throughput"))),
                   ("memory MB", rounded(best.get("memory_mb"), 0)), ("latency p50 / p95 ms",
                   f"{_one_decimal(best.get('latency_ms_p50'))} / {_one_decimal(best.get('latency_ms_p95'))}"),
                   ("fit", duration(best.get("fit_seconds"))), ("model MB", _one_decimal(best.get("model_mb")))])
            + (f'<div class="cfglabel">configuration</div><div class="kv cfg">{cells}</div>' if cells
               else "<p class='muted'>no parameters</p>"))
    return "".join(parts)


def _stat(value: str, label: str) -> str:
    return f'<div class="stat"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def scores_section(ev: Evaluation) -> str:
    if ev.missing or ev.scores is None:
        return _note(ev.missing or "No test scores.")
    labels, scores, th = ev.labels, ev.scores, ev.threshold
    flagged = scores > th["value"]
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    stats = [_stat(f"{th['value']:.4g}", f"image threshold ({th['method']})"),
             _stat(f"{int((flagged & (labels == 1)).sum())} / {n_bad}", "defects detected"),
             _stat(f"{int((flagged & (labels == 0)).sum())} / {n_good}", "false alarms on normals")]
    for key, label in (("image_auroc", "image AUROC"), ("image_f1_max", "best image F1"),
                       ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
        if ev.metrics.get(key) is not None:
            stats.append(_stat(f"{ev.metrics[key]:.3f}", label))
    intro = (f"<p>Best front model: <b>{_e(ev.family)}</b> (run {_e(ev.run_id)}, highest validation quality on the "
             "front within the constraint profile's limits: the model `automl-ad export --best` takes), scored on "
             f"{len(scores)} {_scored(ev)}. The threshold is "
             f"calibrated on {_calibration_normals(th)} at a target false-alarm "
             f"rate of {th['target_false_alarm_rate']:g}, as `automl-ad export` does; {_e(th.get('note'))}.</p>")
    extra = (_note(ev.note) if ev.note else "") + ("" if n_bad else _note(
        f"The scored {ev.scored_on} images hold no defective image: only the normal score distribution is shown."))
    return (intro + f'<div class="stats">{"".join(stats)}</div>' + extra
            + f"<img class='figure' alt='score histogram' src='{histogram_figure(ev)}'>")


def _calibration_normals(threshold: dict) -> str:
    """The normal scores an image threshold was calibrated on, in words."""
    total, folded = threshold.get("n_normal"), threshold.get("n_out_of_fold") or 0
    if not folded:
        return f"held-out normal validation images ({total} scores)"
    return (f"{total} normal scores: {total - folded} held-out validation images and {folded} training images, each "
            "scored by a refit of the model on the other training images")


def _scored(ev: Evaluation) -> str:
    """The images the best model was scored on, and how far to trust them."""
    if ev.scored_on == "test":
        return "test images that took no part in selection"
    return "validation images (the split holds no test images; these selected the model, so they flatter it)"


def curves_section(ev: Evaluation) -> str:
    if ev.missing or ev.scores is None:
        return _note(ev.missing or "No test scores.")
    if ev.labels.min() == ev.labels.max():
        kind = "defective" if ev.labels.min() == 0 else "normal"
        return _note(f"The scored {ev.scored_on} images hold no {kind} image, so ROC and precision-recall curves are "
                     "undefined.")
    return (f"<p>Image-level curves on the {ev.scored_on} images; the dot marks the calibrated threshold's operating "
            "point.</p>"
            f"<img class='figure' alt='ROC and PR curves' src='{curves_figure(ev)}'>")


def operating_section(ev: Evaluation) -> str:
    if ev.missing or ev.scores is None:
        return _note(ev.missing or "No test scores.")
    th, labels, scores = ev.threshold, ev.labels, ev.scores
    rows = []
    for r in ev.operating_points:
        test = rates_at(r["threshold"], labels, scores)
        rows.append([rounded(r["target_false_alarm_rate"]), _e(f"{r['threshold']:.4g}"), rounded(r["false_alarm_rate"]),
                     rounded(r["detection_rate"]), rounded(test["false_alarm_rate"]), rounded(test["detection_rate"])])
    at, calibrated = rates_at(th["value"], labels, scores), f"{th['value']:.4g}"
    validation = ev.validation_rates
    rows.append([rounded(th["target_false_alarm_rate"]), f"{_e(calibrated)} ({_e(th['method'])})",
                 rounded(validation.get("false_alarm_rate")), rounded(validation.get("detection_rate")),
                 rounded(at["false_alarm_rate"]), rounded(at["detection_rate"])])
    columns = ["target false-alarm rate", "threshold", "validation false alarms", "validation detected",
               "test false alarms", "test detected"]
    if ev.scored_on != "test":  # the same images twice
        columns, rows = columns[:4], [row[:4] for row in rows]
    table = _table(columns, rows, set(range(len(columns))), [""] * (len(rows) - 1) + ["front"])
    intro = (f"<p>What the image threshold trades: the share of normal images it flags (false-alarm rate) against "
             f"the share of defective images it catches (detection rate). The curve runs over every threshold on the "
             f"{len(scores)} {ev.scored_on} images; the squares are the threshold table an exported package stores, "
             f"measured on the validation images ({_e(_anomaly_words(ev))}); the dots are the calibrated threshold "
             f"(target false-alarm rate {th['target_false_alarm_rate']:g}). The shaded row is that threshold.</p>")
    return (intro + f"<img class='figure' alt='operating curve' src='{operating_figure(ev)}'>" + table)


def gallery_section(ev: Evaluation) -> str:
    if ev.missing or ev.scores is None:
        return _note(ev.missing or "No test scores.")
    parts = []
    if ev.maps is None:
        parts.append(_note(f"{ev.family} does not localise (no anomaly maps): the images are shown without heatmaps, "
                           "with the ground-truth defect outline in white where a mask exists."))
        vmin = vmax = 0.0
    else:
        normal = ev.maps[ev.labels == 0] if (ev.labels == 0).any() else ev.maps
        vmin, vmax = float(np.percentile(normal, 1)), float(np.percentile(ev.maps, 99.9))
        parts.append(f"<p>Anomaly maps over the {ev.scored_on} images on one colour scale (blue = normal, red = "
                     f"anomalous, {vmin:.3g} to {vmax:.3g}); the ground-truth defect outline is white. Verdicts at "
                     f"the image threshold {ev.threshold['value']:.4g}.</p>")
    for title, explanation, indices in gallery_groups(ev):
        parts.append(f"<h3>{_e(title)} <span class='muted'>— {_e(explanation)}; {len(indices)} shown</span></h3>")
        if not indices:
            parts.append("<p class='muted'>none at this threshold</p>")
            continue
        cells = "".join(f"<figure><img alt='{_e(ev.names[i])}' src='{_thumbnail(ev, i, vmin, vmax)}'><figcaption>"
                        f"{_e(ev.names[i])}<br>score <b>{ev.scores[i]:.4g}</b></figcaption></figure>" for i in indices)
        parts.append(f'<div class="gallery">{cells}</div>')
    return "".join(parts)


def _budget(params: dict) -> str:
    """The search budget (a logged parameter, in seconds) as a duration."""
    try:
        return duration(float(params.get("budget_s")))
    except (TypeError, ValueError):
        return "n/a"


def _header(facts: SearchFacts, tracking_uri: str) -> str:
    search, params = facts.search, facts.params
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(search.start_time / 1000))
    done = sum(t.get("status") == "ok" for t in facts.trials)
    return (f"<header><h1>automl-ad search report — {_e(search.dataset_name or facts.experiment)}</h1>"
            f"<div class='sub'>search run {_e(search.run_id)} · experiment {_e(facts.experiment)} · started "
            f"{_e(started)} · {len(facts.trials)} trials ({done} complete) · budget {_e(_budget(params))}"
            f" · seed {_e(params.get('seed'))}<br>data {_e(params.get('data'))} · tracking {_e(tracking_uri)}</div>"
            "</header>")


def render(facts: SearchFacts, ev: Evaluation, tracking_uri: str) -> str:
    builders = {"profile": lambda: profile_section(facts), "recommendation": lambda: recommendation_section(facts),
                "trials": lambda: trials_section(facts), "pareto": lambda: pareto_section(facts),
                "best-per-family": lambda: best_per_family_section(facts), "scores": lambda: scores_section(ev),
                "operating": lambda: operating_section(ev), "curves": lambda: curves_section(ev),
                "gallery": lambda: gallery_section(ev)}
    sections = []
    for key, title in SECTIONS:
        try:
            body = builders[key]()
        except Exception as exc:
            log.warning("report section %s failed", key, exc_info=True)
            body = _note(f"This section could not be built: {type(exc).__name__}: {exc}")
        sections.append(f'<section id="{key}"><h2>{_e(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{REPORT_TITLE} — "
            f"{_e(facts.experiment)}</title><style>{CSS}</style></head><body>{_header(facts, tracking_uri)}"
            f"<nav>{nav}</nav><main>{''.join(sections)}</main><footer>automl-ad {_e(__version__)} · generated "
            f"{_e(time.strftime('%Y-%m-%d %H:%M'))}</footer></body></html>")


def write_report(target: str | None, out: str | Path, tracking_uri: str | None = None,
                 max_images: int = MAX_TEST_IMAGES, far: float = DEFAULT_FALSE_ALARM_RATE, say=print) -> Path:
    """Build the report of the search ``target`` (a search or trial run id, an experiment, a dataset folder, or
    None for the newest) into the HTML file ``out``."""
    if max_images < 1:
        raise UsageError("--max-images must be at least 1")
    out = Path(out)
    if out.is_file() and not is_report(out):
        raise UsageError(f"{out} exists and is not an automl-ad report; give a new file name (a report is "
                         "only ever replaced by a newer one)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars for each small download
    store = SearchStore(tracking_uri)
    search = store.resolve(target)
    say(f"Reading search {search.run_id} from {store.uri} ...")
    facts = gather(store, search)
    try:
        ev = evaluate_best(store, facts, max_images, far, say)
    except Exception as exc:
        log.warning("scoring the best model failed", exc_info=True)
        ev = Evaluation(f"Scoring the best front model on the test images failed: {type(exc).__name__}: {exc}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(render(facts, ev, store.uri), encoding="utf-8")
    partial.replace(out)  # a failed write leaves an earlier report whole
    return out


def is_report(path: Path) -> bool:
    """Whether the file ``path`` is an automl-ad report (by its title, in the first bytes)."""
    with path.open("rb") as handle:
        return REPORT_TITLE.encode() in handle.read(4096)
