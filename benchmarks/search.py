"""Benchmark the search on a real dataset and write reports/search-<dataset>.md (+ Pareto PNG, JSON).

Ranks trials on synthetic anomalies (``--validation synthetic``; each family only on the kinds it does not train
on) while also scoring the real labelled defects of the validation split, so the report can say how well the
synthetic ranking agrees with the real one: the Spearman correlation over the trials and the regret of the
synthetic choice (automl_ad.evaluation.selection). Uses the shared MobileNetV2 weights so backbone families run
offline.

    python benchmarks/search.py --dataset bottle --budget 20m
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from report_notes import kept_notes  # benchmarks/report_notes.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AD_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_in1k.safetensors"
DATASETS = {"bottle": SHARED / "datasets" / "mvtec_ad" / "bottle",
            "magnetic_tile": SHARED / "datasets" / "mtd" / "magnetic_tile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="bottle")
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--families", default="patchcore,padim,stpm,fastflow,gaussian,frequency,cutpaste")
    parser.add_argument("--work", default="/tmp/automl-ad-search-bench")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    from automl_ad.cli import main as cli
    from automl_ad.evaluation.selection import selection_agreement
    from automl_ad.reporting.rounding import rounded
    from automl_ad.tracking.board import leaderboard
    from automl_ad.tracking.records import SearchStore

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chdir(work)
    os.environ["AUTOML_AD_CACHE_DIR"] = str(work / "cache")  # a cold cache: the first trial on a backbone pays
    code = cli(["search", str(DATASETS[args.dataset]), "--families", args.families, "--budget", args.budget,
                "--validation", "synthetic", "--weights", str(WEIGHTS)])
    if code:
        sys.exit(code)
    rows = leaderboard(str(DATASETS[args.dataset]))
    ok = [r for r in rows if r.get("status") == "ok" and r.get("real_quality") is not None]
    agreement = selection_agreement([r["quality"] for r in ok], [r["real_quality"] for r in ok])
    with_auroc = [r for r in ok if r.get("real_image_auroc") is not None]
    auroc = selection_agreement([r["quality"] for r in with_auroc], [r["real_image_auroc"] for r in with_auroc])
    out = Path(args.out)
    png = SearchStore().artifact_file(rows[0]["search_id"], "pareto.png", work)
    shutil.copy(png, out / f"search-{args.dataset}.png")
    (out / f"search-{args.dataset}.json").write_text(json.dumps(
        {"spearman": agreement.spearman, "regret": agreement.regret, "regret_image_auroc": auroc.regret,
         "trials": rows}, indent=2, default=str))
    lines = [f"# Search on {args.dataset} ({args.budget}, CPU, 2 cores)", "",
             f"`python benchmarks/search.py --dataset {args.dataset} --budget {args.budget}`: families "
             f"{args.families}; ranked on synthetic anomalies (CutPaste, scar, Perlin) on held-out normals, each "
             "family only on the kinds it does not train on; the real defects of the validation split were scored "
             "too, only to measure agreement.", "",
             f"Trials: {len(rows)} ({len(ok)} complete, {sum(r.get('status') == 'failed' for r in rows)} failed, "
             f"{sum(r.get('status') == 'stopped early' for r in rows)} stopped early).",
             f"Spearman rank correlation of synthetic vs real validation quality over complete trials: "
             f"**{rounded(agreement.spearman)}**.",
             f"Regret of the synthetic choice: **{rounded(agreement.regret)}** of real validation quality "
             f"({rounded(auroc.regret)} of real validation image AUROC): the best trial on the real defects minus "
             "the trial ranked best on synthetic anomalies. Measured on the real validation defects: test scores are "
             "computed only for an exported model.", "",
             "| family | synthetic quality | real quality | img/s | peak MB | p50 ms | fit s | Pareto rank |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| {r['family']} | {r['quality']:.3f} | {r['real_quality']:.3f} | {r.get('throughput', 0):.1f} | "
                     f"{r.get('memory_mb', 0):.0f} | {r.get('latency_ms_p50', 0):.1f} | "
                     f"{r.get('fit_seconds', 0):.1f} | {r.get('pareto_rank')} |")
    best = {}
    for r in ok:
        if r["family"] not in best or r["quality"] > best[r["family"]]["quality"]:
            best[r["family"]] = r
    lines += ["", "## Best configuration per family (by synthetic quality)", "",
              "| family | synthetic | real | img/s | peak MB | parameters (besides device and weights) |",
              "|---|---|---|---|---|---|"]
    for family, r in best.items():
        params = {k: v for k, v in r["params"].items() if k not in ("device", "weights")}
        lines.append(f"| {family} | {r['quality']:.3f} | {r['real_quality']:.3f} | {r.get('throughput', 0):.1f} | "
                     f"{r.get('memory_mb', 0):.0f} | {', '.join(f'{k}={v}' for k, v in sorted(params.items()))} |")
    lines += ["", "## Feature cache", "", *_cache_lines(rows), "", f"![Pareto](search-{args.dataset}.png)", ""]
    report = out / f"search-{args.dataset}.md"
    report.write_text("\n".join(lines + kept_notes(report)))
    print("\n".join(lines))


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
