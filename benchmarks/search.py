"""Benchmark the search against its own warm start and anomalib: does the search beat the best default? (issue #11)

Per dataset, in a fresh working folder with a cold feature cache: `automl-ad recommend`, then `automl-ad search
--compare-synthetic` (ranked on the real validation defects; once the budget is spent, every trial's saved model is
also scored on synthetic anomalies). From the trials: the best default configuration, the search's best and the
trial the synthetic ranking would choose are scored on the search's test split (never used for selection), natively
and under anomalib's protocol (maps and masks squashed to 256x256), beside anomalib's PatchCore and PaDiM read from
the anchor CSVs. Writes reports/search-<dataset>.{md,json,png}, reports/search-<dataset>-time.png and the combined
reports/search.md.

    python benchmarks/search.py --dataset bottle --budget 20m
    python benchmarks/search.py --dataset all --budget 20m --anchor-csv /path/to/bsdata-anchor.csv
    python benchmarks/search.py --summary-only            # rebuild reports/search.md from the JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from report_notes import kept_notes  # benchmarks/report_notes.py, beside this script
from search_eval import (
    EARLY_SHARE,
    anchor_sources,
    anomalib_rows,
    best_by,
    chosen_trials,
    complete,
    geometry_text,
    readable_geometry,
    test_scores,
    time_plot,
    trial_end_seconds,
    trial_summary,
)
from shared_data import DATASETS, ROOT, SHARED, WEIGHTS  # benchmarks/shared_data.py

ROLES = {"best_default": "best default", "search_best": "search's best", "synthetic_choice": "synthetic choice"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", choices=[*DATASETS, "all"],
                        help="dataset to benchmark; repeat for several, or 'all' (default: bottle; with "
                        "--summary-only: every dataset with a JSON report)")
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--families", help="comma-separated families (default: the recommendation's shortlist)")
    parser.add_argument("--anchor-csv", type=Path, help="an extra anomalib anchor CSV (model, dataset, image_AUROC, "
                        "pixel_AUPRO, settings), read first; e.g. the ball_screw run (dataset bsdata or ball_screw)")
    parser.add_argument("--work", default="/tmp/automl-ad-search-bench", help="working folder (one per dataset "
                        "inside it, emptied first)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--summary-only", action="store_true",
                        help="only rebuild search.md from the per-dataset JSON reports in --out")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.anchor_csv is not None and not args.anchor_csv.is_file():
        parser.error(f"--anchor-csv {args.anchor_csv}: no such file")
    if args.anchor_csv is not None:
        args.anchor_csv = args.anchor_csv.resolve()  # the benchmark works in another folder
    names = list(DATASETS) if "all" in (args.dataset or []) else list(dict.fromkeys(args.dataset or []))
    if not args.summary_only:
        out.mkdir(parents=True, exist_ok=True)
        for name in names or ["bottle"]:
            result = benchmark(name, args, out)
            write_dataset_report(result, out)
    else:  # the anomalib rows again from the anchor tables (a table added after the run counts), reports rewritten
        for path in sorted(out.glob("search-*.json")):
            result = json.loads(path.read_text())
            if result.get("dataset") in DATASETS and (not names or result["dataset"] in names):
                result["anomalib"] = anomalib_rows(result["dataset"], anchor_sources(ROOT, SHARED, args.anchor_csv))
                write_dataset_report(result, out)
    write_summary(out, names or None)


def benchmark(name: str, args, out: Path) -> dict:
    """Recommend and search on dataset ``name`` in a fresh folder; everything the reports need, as JSON-ready data."""
    from automl_ad.cli import main as cli
    from automl_ad.constraints import parse_duration
    from automl_ad.evaluation.selection import selection_agreement
    from automl_ad.tracking.board import best_so_far
    from automl_ad.tracking.records import SearchStore

    data = DATASETS[name]
    if not data.is_dir():
        sys.exit(f"error: dataset {name} not found at {data}; set AD_SHARED to the shared folder")
    work = Path(args.work).resolve() / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chdir(work)  # the recommendation and the tracking store live under ./.automl-ad
    os.environ["AUTOML_AD_CACHE_DIR"] = str(work / "cache")  # a cold cache: the first trial on a backbone pays
    code = cli(["recommend", str(data), "--weights", str(WEIGHTS)])
    if code:
        sys.exit(f"error: automl-ad recommend failed on {name} (exit {code})")
    search_args = ["search", str(data), "--budget", args.budget, "--weights", str(WEIGHTS), "--compare-synthetic"]
    if args.families:
        search_args += ["--families", args.families]
    load_before = os.getloadavg()
    print(f"load average before the search on {name}: {load_before}", flush=True)
    started = time.monotonic()
    code = cli(search_args)
    wall_s = time.monotonic() - started
    load_after = os.getloadavg()
    print(f"load average after the search on {name}: {load_after}", flush=True)
    if code:
        sys.exit(f"error: automl-ad search failed on {name} (exit {code})")

    store = SearchStore()
    search = store.resolve(str(data))
    trials = store.trials(search.run_id)
    split = store.split(search)
    chosen = chosen_trials(trials)
    tested = {}
    for trial in {t.run_id: t for t in chosen.values() if t is not None}.values():
        print(f"Scoring {trial.family} ({trial.trial}) on the {len(split.test)} test images ...", flush=True)
        tested[trial.run_id] = test_scores(store, search, trial, split)
    picks = {role: None if t is None else {**trial_summary(t), "test": tested[t.run_id]} for role, t in chosen.items()}

    done = complete(trials)
    compared = [t for t in done if "synthetic_quality" in t.metrics]
    agreement = selection_agreement([t.metrics["synthetic_quality"] for t in compared], [t.quality for t in compared])
    best, synthetic = picks["search_best"], picks["synthetic_choice"]
    test_regret = (best["test"]["native"]["image_auroc"] - synthetic["test"]["native"]["image_auroc"]
                   if best and synthetic else None)

    budget_s = parse_duration(args.budget)
    curve = best_so_far(search.run_id)
    ends = trial_end_seconds(store, search, done)
    dots = [(ends[t.run_id], t.quality, t.family) for t in done if t.run_id in ends]
    default_quality = picks["best_default"]["quality"] if picks["best_default"] else None
    time_png = out / f"search-{name}-time.png"
    time_plot(curve, dots, default_quality, budget_s, time_png, f"{name}: search quality against time "
              f"({args.budget}, {len(done)} complete trials)")
    pareto = None
    if "pareto.png" in {a.path for a in store.tracker.client.list_artifacts(search.run_id)}:
        pareto = shutil.copy(store.artifact_file(search.run_id, "pareto.png", work), out / f"search-{name}.png")
    return {"dataset": name, "data": str(data), "budget": args.budget, "budget_s": budget_s,
            "families": args.families or "recommendation's shortlist", "searched_families": search.families,
            "search_run_id": search.run_id, "work_dir": str(work), "search_wall_s": wall_s,
            "loadavg_before": list(load_before), "loadavg_after": list(load_after), "split": split.describe(),
            "chosen": picks, "spearman": agreement.spearman, "n_compared": agreement.n_trials,
            "regret_validation": agreement.regret, "test_auroc_regret": test_regret,
            "anytime": {"curve": curve, "trial_end_s": ends, "early_share": EARLY_SHARE,
                        "best_at_early_share": best_by(curve, EARLY_SHARE * budget_s),
                        "final_best": curve[-1][1] if curve else None},
            "anomalib": anomalib_rows(name, anchor_sources(ROOT, SHARED, args.anchor_csv)),
            "pareto_png": pareto and Path(pareto).name, "time_png": time_png.name,
            "trials": [t.row() for t in trials]}


def write_dataset_report(result: dict, out: Path) -> None:
    """reports/search-<dataset>.json and .md (hand-written notes kept)."""
    from automl_ad.reporting.rounding import rounded

    name, rows = result["dataset"], result["trials"]
    (out / f"search-{name}.json").write_text(json.dumps(result, indent=2, default=str))
    ok = [r for r in rows if r.get("status") == "ok" and r.get("quality") is not None]
    picks, anytime = result["chosen"], result["anytime"]
    lines = [f"# Search on {name} ({result['budget']}, CPU)", "",
             f"`python benchmarks/search.py --dataset {name} --budget {result['budget']}`: families "
             f"{result['families']} ({', '.join(result['searched_families'])}); ranked on the real defects of the "
             "validation split; after the budget every trial's model was also scored on synthetic anomalies "
             "(`--compare-synthetic`, no trial paid for it) to measure "
             "how well label-free selection would have done. Split: " + result["split"] + ".", "",
             f"Load average (1, 5, 15 min) before the search: {_load(result['loadavg_before'])}; after: "
             f"{_load(result['loadavg_after'])}. Search wall time {result['search_wall_s']:.0f} s.", "",
             f"Trials: {len(rows)} ({len(ok)} complete, {sum(r.get('status') == 'screened' for r in rows)} screened, "
             f"{sum(r.get('status') == 'failed' for r in rows)} failed, "
             f"{sum(r.get('status') == 'not started' for r in rows)} not started, "
             f"{sum(r.get('status') == 'stopped early' for r in rows)} stopped early).", "",
             "## Does the search beat the best default? (test split, never used for selection)", "",
             "| trial | family | geometry | val quality | synthetic quality | test AUROC | test AUPRO | "
             "detection @1% FAR (test FAR) | AUROC @256² | AUPRO @256² |", "|---|---|---|---|---|---|---|---|---|---|"]
    for role, label in ROLES.items():
        pick = picks[role]
        if pick is None:
            lines.append(f"| {label} | none complete | | | | | | | | |")
            continue
        native, protocol = pick["test"]["native"], pick["test"]["anomalib"]
        lines.append(f"| {label} | {pick['family']} | {readable_geometry(pick['geometry'])} | "
                     f"{rounded(pick['quality'])} | "
                     f"{rounded(pick['synthetic_quality'])} | {rounded(native['image_auroc'])} | "
                     f"{rounded(native['aupro'])} | {_deployed(pick['test']['deployed'])} | "
                     f"{rounded(protocol['image_auroc'])} | {rounded(protocol['aupro'])} |")
    for model, row in result["anomalib"].items():
        lines.append(f"| anomalib {model} | | {_anchor_geometry(row)} | | | {rounded(row and row['image_auroc'])} | "
                     f"| | {rounded(row and row['image_auroc'])} | {rounded(row and row['aupro'])} |"
                     if row else f"| anomalib {model} | not run | | | | | | | | |")
    sources = sorted({row["source"] for row in result["anomalib"].values() if row})
    lines += ["", "Test AUPRO up to 30% false-positive rate. Detection @1% FAR: share of the test defects caught at "
              "the image threshold an export calibrates on the held-out validation normals for a 1% false-alarm rate "
              "(the test normals never set it; in brackets the false-alarm rate it gives on the test normals; the "
              "JSON also holds `native.detection_at_far`, the oracle rate at the test normals' own 1% quantile). "
              "\"@256²\": anomaly maps "
              "(bilinear) and masks (nearest, > 0.5) squashed to 256x256 as anomalib does, so those columns compare "
              "with anomalib's image_AUROC / pixel_AUPRO; image AUROC does not depend on the maps, so it is the same "
              "in both protocols." + (f" anomalib rows from {', '.join(sources)}." if sources else ""), "",
              f"Spearman rank correlation of synthetic vs real validation quality over {result['n_compared']} complete "
              f"trials: **{rounded(result['spearman'])}**. Regret of the synthetic choice: "
              f"**{rounded(result['test_auroc_regret'])}** test image AUROC (search's best minus synthetic choice; "
              f"{rounded(result['regret_validation'])} of validation quality).", "",
              f"Best validation quality after {anytime['early_share']:.0%} of the budget: "
              f"**{rounded(anytime['best_at_early_share'])}**; at the end: **{rounded(anytime['final_best'])}** "
              f"(best default {rounded(picks['best_default'] and picks['best_default']['quality'])}).", "",
              f"![quality against time]({result['time_png']})", "",
              "## Complete trials", "",
              "| family | default | geometry | val quality | synthetic quality | val AUROC | val AUPRO | img/s | "
              "peak MB | fit s | Pareto rank |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| {r['family']} | {'yes' if r.get('default_config') else ''} | {geometry_text(r['params'])} | "
                     f"{rounded(r['quality'])} | {rounded(r.get('synthetic_quality'))} | "
                     f"{rounded(r.get('val_image_auroc'))} | {rounded(r.get('val_aupro'))} | "
                     f"{r.get('throughput', 0):.1f} | {r.get('memory_mb', 0):.0f} | {r.get('fit_seconds', 0):.1f} | "
                     f"{r.get('pareto_rank')} |")
    best = {}
    for r in ok:
        if r["family"] not in best or r["quality"] > best[r["family"]]["quality"]:
            best[r["family"]] = r
    lines += ["", "## Best configuration per family (by validation quality)", "",
              "| family | val quality | synthetic | img/s | peak MB | parameters (besides device and weights) |",
              "|---|---|---|---|---|---|"]
    for family, r in best.items():
        params = {k: v for k, v in r["params"].items() if k not in ("device", "weights")}
        lines.append(f"| {family} | {rounded(r['quality'])} | {rounded(r.get('synthetic_quality'))} | "
                     f"{r.get('throughput', 0):.1f} | {r.get('memory_mb', 0):.0f} | "
                     f"{', '.join(f'{k}={v}' for k, v in sorted(params.items()))} |")
    lines += ["", "## Feature cache", "", *_cache_lines(rows), ""]
    if result["pareto_png"]:
        lines += [f"![Pareto]({result['pareto_png']})", ""]
    report = out / f"search-{name}.md"
    report.write_text("\n".join(lines + kept_notes(report)))
    print("\n".join(lines))


def write_summary(out: Path, names: list[str] | None) -> None:
    """reports/search.md: one row per dataset with a JSON report in ``out`` (no search is rerun); every name in
    ``names`` must have one."""
    from automl_ad.reporting.rounding import rounded

    missing = [name for name in names or [] if not (out / f"search-{name}.json").is_file()]
    if missing:
        sys.exit(f"error: no search-{missing[0]}.json in {out}; run the benchmark on {missing[0]} first")
    paths = [out / f"search-{name}.json" for name in DATASETS if (out / f"search-{name}.json").is_file()]
    if not paths:
        sys.exit(f"error: no search-<dataset>.json in {out}; run the benchmark first")
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except ValueError as exc:
            sys.exit(f"error: {path} is not valid JSON ({exc}); rerun the benchmark on that dataset")
        lacking = {"dataset", "budget", "chosen", "anomalib", "spearman", "test_auroc_regret", "anytime",
                   "loadavg_before", "loadavg_after"} - set(result)
        if lacking:
            sys.exit(f"error: {path} was written by an older version of this benchmark (no {', '.join(sorted(lacking))}"
                     "); rerun the benchmark on that dataset to regenerate it")
        results.append(result)

    def pick(result: dict, role: str, with_geometry: bool) -> str:
        p = result["chosen"][role]
        if p is None:
            return "none complete" + (" | | | |" if with_geometry else " | | |")
        cells = [p["family"], *([readable_geometry(p["geometry"])] if with_geometry else []),
                 rounded(p["test"]["native"]["image_auroc"]),
                 rounded(p["test"]["native"]["aupro"]), rounded(p["test"]["anomalib"]["aupro"])]
        return " | ".join(cells)

    def anchor(row: dict | None) -> str:
        return "not run" if row is None else f"{rounded(row['image_auroc'])} / {rounded(row['aupro'])}"

    lines = ["# Search vs best default vs anomalib (issue #11)", "",
             "Generated by `python benchmarks/search.py` (rebuild: `--summary-only`). Test split of each search "
             "(never used for selection). AUPRO up to 30% FPR at the model's map size; AUPRO @256²: maps and masks "
             "squashed to 256x256 as anomalib does. anomalib cells: image AUROC / pixel AUPRO. Spearman: synthetic "
             "vs real validation quality over complete trials; test regret: test AUROC of the search's best minus "
             "that of the synthetic choice.", "",
             "| dataset | budget | best default | test AUROC | AUPRO | AUPRO @256² | search best | geometry | "
             "test AUROC | AUPRO | AUPRO @256² | anomalib PatchCore | anomalib PaDiM | Spearman | test regret | "
             "best at 10% of budget vs final | load before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        anytime = r["anytime"]
        lines.append(f"| {r['dataset']} | {r['budget']} | {pick(r, 'best_default', False)} | "
                     f"{pick(r, 'search_best', True)} | {anchor(r['anomalib']['patchcore'])} | "
                     f"{anchor(r['anomalib']['padim'])} | {rounded(r['spearman'])} | "
                     f"{rounded(r['test_auroc_regret'])} | {rounded(anytime['best_at_early_share'])} vs "
                     f"{rounded(anytime['final_best'])} | {r['loadavg_before'][0]:.2f} → {r['loadavg_after'][0]:.2f} |")
    report = out / "search.md"
    report.write_text("\n".join(lines + [""] + kept_notes(report)))
    print("\n".join(lines))


def _deployed(rates: dict) -> str:
    from automl_ad.reporting.rounding import rounded

    return f"{rounded(rates['detection_rate'])} ({rounded(rates['false_alarm_rate'])})"


def _load(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _anchor_geometry(row: dict | None) -> str:
    size = row and row["settings"].get("image_size")
    return f"squash {'x'.join(map(str, size))}" if size else ""


def _cache_lines(rows: list[dict]) -> list[str]:
    """What the shared feature cache saved over the search's trials (from their features_* metrics)."""
    total = lambda key: sum(r.get(key) or 0.0 for r in rows)  # noqa: E731
    computed, loaded, saved = total("features_computed_s"), total("features_loaded_s"), total("features_saved_s")
    trial_time = total("wall_seconds")
    if not total("features_loaded_images"):
        return ["No trial reused cached features."]
    return [f"Trials computed backbone features for {total('features_computed_images'):.0f} images in {computed:.1f} s "
            f"and loaded {total('features_loaded_images'):.0f} images' features from the cache in {loaded:.1f} s. "
            f"Computing those again would have taken {loaded + saved:.1f} s (the time measured when they were "
            f"stored): the cache made that step {(loaded + saved) / max(loaded, 1e-9):.0f}x faster and saved "
            f"{saved:.0f} s, {100 * saved / max(trial_time, 1e-9):.0f}% of the summed trial time ({trial_time:.0f} s)."]


if __name__ == "__main__":
    main()
