"""The ``automl-ad`` command line: each command parses its arguments, calls one library function
(:mod:`automl_ad.journey` or a lower layer) and prints the result. The library (numpy, torch, MLflow...) is
imported when a command runs, so ``--help`` and argument errors answer at once.

Exit codes: 0 success, 1 unexpected error, 2 usage or configuration error, 3 data problems.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from automl_ad.defaults import (
    DEFAULT_FALSE_ALARM_RATE,
    DEMO_DATA_DIR,
    MIN_REAL_VALIDATION_DEFECTS,
    QUALITY_METRICS,
    SEARCH_BUDGET,
    SHORTLIST_SIZE,
    SHORTLIST_TIE_POINTS,
    UI_HOST,
    UI_PORT,
    UI_STOP_GRACE_S,
)
from automl_ad.errors import AutomlAdError, UsageError
from automl_ad.reporting.rounding import duration, rounded
from automl_ad.version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DATA = 0, 1, 2, 3
#: File errors a user can act on: a read-only file system, no permission, a full disk or quota.
_CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT}

log = logging.getLogger("automl_ad")


def _checked(convert, what: str, valid, rule: str):
    """An argparse type: ``convert`` the text (else "not {what}") and require ``valid(value)`` (else ``rule``)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    return parse


_port = _checked(int, "a port number (1-65535)", lambda v: 1 <= v <= 65535, "must be a port in 1-65535")
_at_least_one = _checked(int, "a whole number", lambda v: v >= 1, "must be at least 1")
_non_negative = _checked(int, "a whole number", lambda v: v >= 0, "must be 0 or more")
_rate = _checked(float, "a number", lambda v: 0 < v < 1, "must lie strictly between 0 and 1 (0.01 = 1%)")


def _check_output_path(out: str | Path, kind: str | None = None) -> Path:
    """Raise UsageError, before any long work, when ``out`` cannot be written as a ``kind`` ("file" or "folder"; None:
    either): it exists as the other kind, a path component above it is a file, or it (or the nearest folder above it
    that exists) is not writable. Missing folders are created."""
    out = Path(out)
    if kind == "folder" and out.exists() and not out.is_dir():
        raise UsageError(f"{out} is an existing file, not a folder; give a folder path")
    if kind == "file" and out.is_dir():
        raise UsageError(f"{out} is a folder; give the path of the file to write")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write {out}: {blocking} is a file, not a folder")
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise UsageError(f"cannot write {out}: {existing} is not writable (read-only file system or no "
                         "permission); choose another location")
    return out


def _console(stderr: bool = False):
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _full_scale_note(full_scale: int | None) -> str:
    """How 16-bit pixels are read, when not by 65535 (a 12-bit camera's files)."""
    if full_scale is None:
        return ""
    bits = full_scale.bit_length()
    return f" ({bits}-bit values in 16-bit files: read as 0-{full_scale})"


def _print_profile(console, profile) -> None:
    c, s, st, al = profile.counts, profile.size, profile.structure, profile.alignment
    defects = ", ".join(f"{k} {v}" for k, v in c.abnormal.items()) or "none"
    size = (f"{s.width_median:g}x{s.height_median:g}" if s.distinct_sizes == 1 else
            f"{s.distinct_sizes} sizes, {s.width_min}-{s.width_max} x {s.height_min}-{s.height_max} (median "
            f"{s.width_median:g}x{s.height_median:g})")
    console.print(f"[bold]{escape(profile.name)}[/bold]  ({profile.layout} layout, {escape(str(profile.root))})",
                  emoji=False)
    console.print(f"  images: {c.normal_for_training} normal for training, {c.normal_test} normal test, "
                  f"defects: {defects}; {c.masks} masks; {c.skipped_files} file(s) skipped")
    console.print(f"  size: {size}; colour: {profile.color.mode}; bit depth: "
                  f"{'/'.join(map(str, profile.color.bit_depths))}{_full_scale_note(profile.color.full_scale)}")
    periodic = "periodic" if st.periodic else "not periodic"
    console.print(f"  structure: [bold]{st.kind}[/bold] (confidence {st.confidence:.2f}; aligned detail "
                  f"{st.aligned_detail:.2f}, background share {st.background_share:.2f}, {periodic} "
                  f"{st.periodicity:.2f})")
    console.print(f"  alignment: {al.score:.2f} (template matching {'viable' if al.template_viable else 'not viable'}, "
                  f"per-position statistics {'viable' if al.per_position_viable else 'not viable'}; "
                  f"median shift {al.median_shift:.1%})")
    console.print(f"  aspect ratio (width/height): {s.aspect_median:.2f} (10-90%: {s.aspect_p10:.2f}-"
                  f"{s.aspect_p90:.2f}); structure analysed at {profile.sample_hw[1]}x{profile.sample_hw[0]}")
    if profile.defects:
        d = profile.defects
        console.print(f"  defect size: {d.area_fraction_median:.2%} of the image (median; {d.area_fraction_min:.2%}"
                      f"-{d.area_fraction_max:.2%}), {d.small_defect_share:.0%} under 1%; largest region "
                      f"{d.size_px_median:.0f} px across (median; 10% of masks: {d.size_px_p10:.0f} px or less, "
                      f"{d.size_fraction_p10:.1%} of the short side, {d.base_cells_p10:.1f} feature cells at the "
                      "default 256x256 squash)")
    else:
        px, source = profile.smallest_defect()
        console.print(f"  smallest defect: ~{px:.0f} px ({escape(source)})", emoji=False)
    if profile.overrides:
        console.print(f"  overridden by your constraint profile: {escape(str(profile.overrides))}", emoji=False)


def _print_recommendation(console, recommendation, top_reasons: int = 3) -> None:
    sc = recommendation.scenario
    console.print(f"  scenario (report §6): complexity {sc['complexity']}, {sc['normals']} normals, "
                  f"{sc['abnormals']} abnormals → anomaly detection: {sc['anomaly_detection']}, "
                  f"supervised model: {sc['supervised']}")
    g = recommendation.geometry
    if g:
        console.print(f"  input geometry: [bold]{escape(g['key'])}[/bold] ({g['tiles']} network input(s) per "
                      f"image): smallest defect {g['cells']:.1f} feature cells (default "
                      f"{escape(g['default']['key'])}: {g['default']['cells']:.1f})", emoji=False)
        for reason in g["reasons"]:
            console.print(f"     why: {escape(reason)}", emoji=False)
        if g["alternatives"]:
            others = ", ".join(f"{a['key']} ({a['cells']:.1f} cells, ~{a['backbone_ms']:g} ms)"
                               for a in g["alternatives"])
            console.print(f"     also worth searching: {escape(others)}", emoji=False)
    if recommendation.backbone_note:
        console.print(f"  backbones: {escape(recommendation.backbone_note)}", emoji=False)
    table = Table(title=f"Routes for {escape(recommendation.dataset)} under '{escape(recommendation.constraints)}'",
                  show_lines=False)
    for column in ("#", "route", "score", "conf.", "status", "families", "backbone @ px", "est. ms"):
        table.add_column(column, justify="right" if column in ("#", "score", "conf.", "est. ms") else "left")
    for i, c in enumerate(recommendation.candidates, 1):
        status = "[green]shortlist[/green]" if c.shortlisted else "[red]excluded[/red]" if c.excluded else ""
        backbone = f"{c.backbone} @ {c.resolution}" if c.backbone else f"— @ {c.resolution}"
        table.add_row(str(i), escape(c.name), f"{c.score:.1f}", f"{c.confidence:.2f}", status,
                      escape(", ".join(c.families)), escape(backbone), f"{c.estimated_latency_ms:g}")
    console.print(table, emoji=False)
    for c in recommendation.candidates:
        if not (c.shortlisted or c.excluded):
            continue
        mark = "[green]+[/green]" if c.shortlisted else "[red]x[/red]"
        console.print(f" {mark} [bold]{escape(c.name)}[/bold]", emoji=False)
        for reason in c.reasons_for[:top_reasons]:
            console.print(f"     for: {escape(reason)}", emoji=False)
        for reason in c.reasons_against[:top_reasons]:
            console.print(f"     against: {escape(reason)}", emoji=False)


def cmd_recommend(args) -> int:
    from automl_ad import journey

    result = journey.recommend_data(args.data, args.category, args.profile, args.weights, args.top, args.strict,
                                    progress=not args.json, screen=args.screen)
    if args.json:
        payload = [{"profile": p.to_dict(), "recommendation": r.to_dict(),
                    "problems": [x.to_dict() for x in d.problems], "screen": s.to_dict() if s else None}
                   for d, p, r, s in zip(result.datasets, result.profiles, result.recommendations, result.screens)]
        print(json.dumps({"categories": payload, "state": str(result.state_file)}, indent=2))
        return EXIT_OK
    console = _console()
    _show_recommended(console, result)
    console.print(f"Saved profile and recommendation under {result.state_file.parent} "
                  "(a later `automl-ad search` picks them up).", markup=False)
    return EXIT_OK


def _show_recommended(console, result) -> None:
    from automl_ad.search.validation import too_few_to_search

    for dataset, profile, recommendation, screen in zip(result.datasets, result.profiles, result.recommendations,
                                                        result.screens):
        _print_problems(console, dataset.problems)
        _print_profile(console, profile)
        _print_recommendation(console, recommendation)
        refusal = too_few_to_search(dataset)
        if refusal:
            console.print(f"warning: `automl-ad search` will refuse this data: {refusal}", style="yellow",
                          markup=False, emoji=False)
        if screen is not None:
            _print_screen(console, screen, dataset.root)
        console.print()


def _print_screen(console, screen, root: Path, shown: int = 15) -> None:
    """The good images that look unlike the others, highest score first, and what to do about them."""
    if screen.skipped:
        console.print(f"Good-image screen: skipped ({screen.skipped}).", markup=False)
        return
    suspects = screen.suspects
    console.print(f"Good-image screen ({screen.family} on {screen.backbone}, each of {screen.folds} folds scored by "
                  f"a model fitted on the others, {len(screen.scores)} images, {screen.seconds:.0f} s): "
                  f"{len(suspects)} look unlike the others (score above {screen.fence:.3g}, the far-out fence of "
                  f"all scores; median {statistics.median(s for _, s in screen.scores):.3g}).", markup=False)
    for path, score in suspects[:shown]:
        console.print(f"  {score:8.3g}  {_relative(path, root)}", markup=False)
    if len(suspects) > shown:
        console.print(f"  ... and {len(suspects) - shown} more (all in {screen.file})", markup=False)
    if suspects:
        console.print("Check them: a defective image belongs in a defect folder (or out of the data), since the "
                      "search would learn it as normal; an unusual good one is fine. Then run recommend again.",
                      markup=False)


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _print_problems(console, problems) -> None:
    serious = [p for p in problems if p.severity != "note"]
    notes = len(problems) - len(serious)
    for problem in serious[:20]:
        console.print(str(problem), style="yellow", markup=False, emoji=False)
    if len(serious) > 20:
        console.print(f"... and {len(serious) - 20} more problems (see --json)")
    if notes:
        console.print(f"({notes} non-image file(s) ignored)")


def cmd_profile(args) -> int:
    from automl_ad import journey

    if args.out:
        _check_output_path(args.out)
    result = journey.profile_data(args.data, args.category, args.strict, progress=not args.json, out=args.out)
    if args.json:
        print(json.dumps([p.to_dict() for p in result.profiles], indent=2))
        return EXIT_OK
    console = _console()
    for dataset, profile in zip(result.datasets, result.profiles):
        _print_problems(console, dataset.problems)
        _print_profile(console, profile)
        console.print(f"  profiled in {profile.profiling_seconds:.1f} s")
    return EXIT_OK


def cmd_demo(args) -> int:
    from automl_ad import journey

    console = _console()
    demo = journey.run_demo(args.out, args.budget, args.profile, args.weights, args.seed, args.top,
                            say=lambda text: console.print(text, markup=False),
                            show_recommended=lambda result: _show_recommended(console, result), console=console)
    if demo.search is None:
        return EXIT_OK
    scored = [r for r in demo.predictions if r["verdict"] != "error"]
    console.print(f"\nDemo data: {demo.data}\nPackage: {demo.export.path} ({demo.export.trial.family})\n"
                  f"Predictions: {len(scored)} images scored, "
                  f"{sum(r['verdict'] == 'anomalous' for r in scored)} anomalous\nReport: {demo.report}\n"
                  "Browse the search: automl-ad ui   |   ranked trials: automl-ad leaderboard --pareto\n"
                  f"Try: automl-ad recommend {demo.data}/object --profile edge-cpu, then automl-ad search --budget 10m",
                  markup=False)
    return EXIT_OK


def cmd_search(args) -> int:
    from automl_ad import journey
    from automl_ad.constraints import parse_duration
    from automl_ad.search.engine import check_store_free
    from automl_ad.search.request import check_search_limits

    console = _console()
    budget = (None if args.resume else SEARCH_BUDGET) if args.budget is None else args.budget
    check_search_limits(None if budget is None else parse_duration(budget), args.max_trials, args.trial_timeout,
                        args.resume)  # before the slow planning
    check_store_free(args.tracking_uri)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    result = journey.search_data(args.data, args.category, args.profile, families, args.weights, budget,
                                 say=lambda text: console.print(text, markup=False), console=console,
                                 max_trials=args.max_trials, seed=args.seed, metric=args.metric,
                                 validation=args.validation, tracking_uri=args.tracking_uri, address=args.address,
                                 false_alarm_rate=args.false_alarm_rate, compare_synthetic=args.compare_synthetic,
                                 resume=args.resume, trial_timeout_s=args.trial_timeout)
    ok = [t for t in result.trials if t.get("status") == "ok"]
    console.print(f"\n{len(result.trials)} trials ({len(ok)} complete); Pareto front of {len(result.front)}:")
    _print_leaderboard(console, result.front)
    console.print(f"\nTracking store: {result.tracking_uri} (experiment '{result.experiment}', search run "
                  f"{result.parent_run_id}).\nCompare: automl-ad leaderboard '{result.experiment}' "
                  "--pareto   |   browse: automl-ad ui", markup=False)
    return EXIT_OK


#: Leaderboard columns: (trial key, title, how a value is shown; None = as it is).
_BOARD_COLUMNS = (("family", "family", None), ("input", "input", None), ("quality", "quality", rounded),
                  ("throughput", "img/s", lambda v: rounded(v, 1)), ("memory_mb", "MB", lambda v: rounded(v, 0)),
                  ("latency_ms_p50", "p50 ms", lambda v: rounded(v, 1)), ("fit_seconds", "fit", duration),
                  ("pareto_rank", "rank", None), ("run_id", "run", None))


def _print_leaderboard(console, rows: list[dict], best: list[tuple[float, float]] | None = None) -> None:
    table = Table()
    for key, title, _ in _BOARD_COLUMNS:  # a run id stays whole (export and predict take it); the input folds
        table.add_column(title, **({"no_wrap": True, "min_width": 32} if key == "run_id" else
                                   {"overflow": "fold"} if key == "input" else {}))
    for row in sorted(rows, key=lambda r: -(r.get("quality") or 0)):
        table.add_row(*["-" if row.get(key) is None else (show or str)(row[key]) for key, _, show in _BOARD_COLUMNS])
    console.print(table)
    resolution = _validation_resolution_line(rows)
    if resolution:
        console.print(resolution, highlight=False)
    if best:
        console.print(f"best so far: {rounded(best[-1][1])} at {best[-1][0]:.0f} s (curve: "
                      + ", ".join(f"{rounded(q)} at {t:.0f} s" for t, q in best) + ")", highlight=False)


def _validation_resolution_line(rows: list[dict]) -> str | None:
    """How finely the validation set ranks the best trial's quality (None when its runs did not record its size)."""
    from automl_ad.search.validation import validation_resolution

    best = max((r for r in rows if isinstance(r.get("quality"), (int, float))), key=lambda r: r["quality"],
               default=None)
    if best is None or not best.get("val_normal_images") or not best.get("val_anomalous_images"):
        return None
    normals, anomalies = int(best["val_normal_images"]), int(best["val_anomalous_images"])
    noise = validation_resolution(best["quality"], normals, anomalies)
    return (f"validation: {normals} normal + {anomalies} anomalous images resolve about ±{noise:.3f} at quality "
            f"{rounded(best['quality'])}; smaller differences between trials are within its noise")


def cmd_leaderboard(args) -> int:
    from automl_ad.tracking.board import best_so_far, leaderboard

    rows = leaderboard(args.target, tracking_uri=args.tracking_uri, pareto=args.pareto)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_leaderboard(_console(), rows, best_so_far(args.target, tracking_uri=args.tracking_uri))
    return EXIT_OK


def _check_port_free(host: str, port: int) -> None:
    """Raise UsageError when nothing may listen on ``host:port`` (another program holds it, or it is privileged)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port is free
        try:
            probe.bind((host, port))
        except PermissionError:
            raise UsageError(f"port {port} needs administrator rights; choose one above 1023 with --port") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use (another `automl-ad ui` or MLflow "
                                 "server?); stop that one or choose another port with --port") from None
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _stop_process_group(group: int, grace_s: float) -> None:
    """SIGTERM every process of ``group``, give them ``grace_s`` to exit, then SIGKILL whatever is left."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        try:
            os.killpg(group, signum)
            while time.monotonic() < deadline:
                time.sleep(0.1)
                os.killpg(group, 0)
        except ProcessLookupError:
            return


def cmd_ui(args) -> int:
    from automl_ad.tracking.store import check_tracking_uri, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        raise UsageError(f"{uri} is an MLflow server with its own UI: open that address in a browser")
    _check_port_free(UI_HOST, args.port)
    # one worker and no GenAI job runner: MLflow's defaults start a dozen processes a local browse does not need
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", UI_HOST,
               "--port", str(args.port), "--workers", "1"]
    server, received = None, []

    def forward(signum, frame=None):  # a stop request goes to the server's whole process group
        if signum not in received:
            received.append(signum)
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signum)

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in stop_signals}
    try:
        print(f"MLflow UI for {uri} at http://{UI_HOST}:{args.port} (starting; Ctrl-C to stop)", flush=True)
        server = subprocess.Popen(command, env=env, start_new_session=True)  # its own group, stopped as a whole
        if received:  # a stop request came while it was being started
            forward(received[0])
        code = server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if server is not None:
            _stop_process_group(server.pid, UI_STOP_GRACE_S)  # anything the server left behind
    if received:
        print("MLflow UI stopped.", file=sys.stderr)
        return 128 + received[0]
    return code


def cmd_export(args) -> int:
    from automl_ad.deploy.export import export_model

    if args.best == bool(args.run_id):
        raise UsageError("give either a RUN_ID or --best (with --objective), not both or neither")
    _check_output_path(args.out, "folder")
    console = _console()
    result = export_model(args.out, run_id=args.run_id, target=args.experiment if args.best else None,
                          objective=args.objective, tracking_uri=args.tracking_uri, far=args.false_alarm_rate,
                          overwrite=args.overwrite, mlflow=args.mlflow,
                          say=lambda text: console.print(text, markup=False))
    image = result.manifest["thresholds"]["image"]
    console.print(f"Exported run {result.trial.run_id} ({result.trial.family}) to {result.path}; image threshold "
                  f"{image['value']:.4g} ({image['method']}, target false-alarm rate "
                  f"{image['target_false_alarm_rate']:g}).", markup=False)
    test = result.manifest["metrics"].get("test")
    if test:
        console.print(f"Test set (never used for selection): image AUROC {rounded(test.get('image_auroc'))}, AUPRO "
                      f"{rounded(test.get('aupro'))}.", markup=False)
    if result.model_uri:
        console.print(f"Logged as MLflow model {result.model_uri}. Serve it: MLFLOW_TRACKING_URI={result.tracking_uri} "
                      f"mlflow models serve -m {result.model_uri} --env-manager local -p 5001, then POST "
                      "{\"inputs\": [\"<base64 image file>\"]} to http://127.0.0.1:5001/invocations", markup=False)
    console.print(f"Next: automl-ad predict {result.path} IMAGES --out predictions/", markup=False)
    return EXIT_OK


def cmd_report(args) -> int:
    from automl_ad.reporting.html_report import write_report

    _check_output_path(args.out, "file")
    console = _console()
    path = write_report(args.target, args.out, tracking_uri=args.tracking_uri, max_images=args.max_images,
                        far=args.false_alarm_rate, say=lambda text: console.print(text, markup=False))
    console.print(f"Report written to {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in a "
                  "browser).", markup=False)
    return EXIT_OK


def cmd_predict(args) -> int:
    from automl_ad import journey

    _check_output_path(args.out, "folder")
    started = time.perf_counter()
    rows = journey.predict_images(args.package, args.inputs, args.out, args.threshold, progress=not args.json,
                                  overwrite=args.overwrite)
    wall_s = time.perf_counter() - started
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    console = _console()
    errors = [r for r in rows if r["verdict"] == "error"]
    anomalous = sum(r["verdict"] == "anomalous" for r in rows)
    for row in errors:
        console.print(f"skipped {row['image']}: {row['error']}", style="yellow", markup=False, emoji=False)
    console.print(f"{len(rows) - len(errors)} images scored: {anomalous} anomalous, "
                  f"{len(rows) - len(errors) - anomalous} normal; {len(errors)} skipped. Results in {args.out} "
                  "(predictions.csv, predictions.json, overlays/, masks/).", markup=False)
    unlike = [r for r in rows if r.get("note")]
    if unlike:
        console.print(f"warning: {len(unlike)} of {len(rows) - len(errors)} images do not look like the training "
                      f"images (first: {unlike[0]['image']}: {unlike[0]['note']}; all in the note column of "
                      "predictions.csv). The threshold was calibrated on images like the training ones, so verdicts "
                      "on these are unreliable: check the camera, crop, orientation and colour, or search again with "
                      "such images among the training ones.", style="yellow", markup=False, emoji=False)
    scored = [r["score_ms"] for r in rows if r.get("score_ms") is not None]
    if scored:
        console.print(f"Took {wall_s:.1f} s with loading the package ({len(scored) / wall_s:.1f} images/s); the "
                      f"model's median time per image {statistics.median(scored):.0f} ms, with overlays and masks "
                      "written alongside.", markup=False)
    return EXIT_OK


def _parse_params(items: list[str]) -> dict:
    from automl_ad.safe_yaml import load_yaml_text

    """``k=v`` pairs; values are read as YAML scalars/lists (0.1, true, [8, 16], resnet18)."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects key=value, got {item!r}")
        parsed = load_yaml_text(value, f"--param {key}") if value else None
        params[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return params


def cmd_fit(args) -> int:
    from automl_ad import journey

    _check_output_path(args.out, "folder")
    console = _console()
    params = _parse_params(args.param)
    fitted = journey.fit_model(args.data, args.family, args.out, params, args.category, args.weights, args.profile,
                               args.strict, args.overwrite, say=lambda text: console.print(text, markup=False))
    detector = fitted.detector
    console.print(f"Fitted in {detector.fit_seconds_:.1f} s (peak memory {detector.fit_peak_rss_mb_:.0f} MB); "
                  f"saved to {fitted.out}. Next: automl-ad evaluate {fitted.out} {args.data}", markup=False)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from automl_ad import journey

    if args.out:
        _check_output_path(args.out, "folder")
    result = journey.evaluate_model(args.model, args.data, args.out, args.category, args.strict,
                                    measure_cost=not args.no_cost, progress=not args.json)
    for warning in result.warnings:
        log.warning(warning)
    if args.json:
        print(json.dumps(result.summary, indent=2))
        return EXIT_OK
    console = _console()
    _print_evaluation(console, result.summary, result.out, result.overlays)
    if result.labels.min() == result.labels.max():
        present, missing = ("defective", "normal") if result.labels.min() else ("normal", "defective")
        console.print(f"Note: every test image is {present}, so the detection metrics are n/a; add {missing} test "
                      "images to measure them.", markup=False)
    return EXIT_OK


def _print_evaluation(console, summary: dict, out: Path, overlays: list) -> None:
    table = Table(title=f"{summary['family']} on {summary['dataset']} ({summary['n_test']} test images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():
        table.add_row(key, rounded(value))
    units = {"fit_seconds": "s", "latency_ms_p50": "ms", "latency_ms_p95": "ms", "throughput_ips": "img/s",
             "peak_rss_mb_fit": "MB", "peak_rss_mb_score": "MB", "model_mb": "MB"}
    for key, unit in units.items():
        value = summary["cost"].get(key)
        table.add_row(key, duration(value) if unit == "s" else "n/a" if value is None else f"{value:.1f} {unit}")
    console.print(table)
    console.print(f"Metrics saved to {out / 'metrics.json'}" + (f"; {len(overlays)} heatmaps in {out / 'heatmaps'}"
                                                                  if overlays else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automl-ad", description="Pick and tune the right industrial image anomaly-detection method.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 usage/configuration error, 3 data problems.")
    parser.add_argument("--version", action="version", version=f"automl-ad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(p):
        p.add_argument("data", help="dataset folder (MVTec style, plain good/ + defect folders, flat, or a root of "
                       "categories)")
        p.add_argument("--category", help="only this category of a multi-category root")
        p.add_argument("--strict", action="store_true", help="fail on any bad file instead of skipping it")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = sub.add_parser("recommend", help="profile the data, rank the 14 routes, explain why, shortlist for search")
    data_args(p)
    p.add_argument("--profile", help="constraint profile YAML (see profiles/); default: this machine, accuracy first")
    p.add_argument("--top", type=_at_least_one, default=SHORTLIST_SIZE,
                   help=f"shortlist size (default {SHORTLIST_SIZE}); routes within {SHORTLIST_TIE_POINTS:g} "
                        "points of the last one shortlisted join it")
    p.add_argument("--weights", help="local backbone weights file (as for search): offline, only backbones with "
                   "weights here are proposed")
    p.add_argument("--no-screen", dest="screen", action="store_false",
                   help="skip screening the good images for ones that look unlike the others (out-of-fold "
                        "PatchCore scores: three fits on the good images)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("profile", help="validate the data and print its profile (counts, texture/object, alignment)")
    data_args(p)
    p.add_argument("--out", help="write the profile JSON here: a file (a name with a suffix, e.g. prof.json) for one "
                   "category, else a folder with one <category>.json each")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("fit", help="fit one detector family on the normal training images and save it")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--family", required=True, help="detector family (e.g. patchcore, padim, stpm)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="detector parameter, repeatable")
    p.add_argument("--weights", help="local backbone weights file (timm state_dict) for offline use")
    p.add_argument("--profile", help="constraint profile whose backbone_weights supply local weights")
    p.add_argument("--out", required=True, help="folder for the fitted model")
    p.add_argument("--overwrite", action="store_true", help="replace a model folder written by an earlier fit")
    p.add_argument("--category", help="only this category of a multi-category root")
    p.add_argument("--strict", action="store_true", help="fail on any bad file instead of skipping it")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="metrics, cost figures and heatmaps of a fitted model on the test images")
    p.add_argument("model", help="folder written by `automl-ad fit`")
    data_args(p)
    p.add_argument("--out", help="output folder (default MODEL/evaluation)")
    p.add_argument("--no-cost", action="store_true", help="skip latency/throughput/memory measurement")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="search hyperparameters across the shortlisted families (Ray Tune + Optuna)")
    p.add_argument("data", nargs="?", help="dataset folder (default: the one of the last `automl-ad recommend`)")
    p.add_argument("--category", help="only this category of a multi-category root")
    p.add_argument("--profile", help="constraint profile YAML (latency budget narrows the backbones)")
    p.add_argument("--budget", help=f"time budget: 8h, 30m, 90s (default {SEARCH_BUDGET}; with --resume "
                   "the search's own budget, which a larger --budget extends)")
    p.add_argument("--families", help="comma-separated families (default: the recommendation's shortlist)")
    p.add_argument("--max-trials", type=int, help="stop after this many trials (at least 1; default: no limit but "
                   "the budget)")
    p.add_argument("--trial-timeout", type=float, help="seconds one trial may take at most (default: no cap of "
                   "its own: each trial's limit is a margin over its predicted time plus slack, within the remaining "
                   "budget)")
    p.add_argument("--metric", default="combined", choices=QUALITY_METRICS,
                   help="what trials are ranked by on validation: combined = mean of image AUROC and AUPRO; "
                   "detection_at_far = share of defects detected at a false-alarm rate of "
                   f"{DEFAULT_FALSE_ALARM_RATE:g} (see --false-alarm-rate)")
    p.add_argument("--false-alarm-rate", type=_rate, default=DEFAULT_FALSE_ALARM_RATE,
                   help="the false-alarm rate on normal images at which --metric detection_at_far counts detected "
                   f"defects: the rate you will deploy at (default {DEFAULT_FALSE_ALARM_RATE:g})")
    p.add_argument("--validation", default="auto", choices=("auto", "real", "synthetic"),
                   help="rank on labelled defects (real) or synthetic anomalies; auto = real when validation gets at "
                   f"least {MIN_REAL_VALIDATION_DEFECTS} of them, synthetic anomalies beside fewer, synthetic alone "
                   "without any")
    p.add_argument("--compare-synthetic", action="store_true",
                   help="ranking on real defects: score every trial on synthetic anomalies too, to see how well "
                   "label-free selection would have ranked them (scored after the budget, from the saved models)")
    p.add_argument("--weights", help="local backbone weights file for offline use")
    p.add_argument("--address", help="Ray cluster: auto or ray://host:port (default: a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.add_argument("--resume", action="store_true", help="continue the last search of this dataset from this "
                   "working directory (remaining budget; trials a killed search lost run again)")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of the data split and the search")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("leaderboard", help="trials of a search ranked by quality, with the Pareto front")
    p.add_argument("target", nargs="?", help="dataset folder or experiment name (default: the last search here)")
    p.add_argument("--pareto", action="store_true", help="only the Pareto front")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store at localhost")
    p.add_argument("--port", type=_port, default=UI_PORT, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("export", help="package a searched model with calibrated thresholds for deployment")
    p.add_argument("run_id", nargs="?", help="MLflow run id of a trial (see `automl-ad leaderboard`)")
    p.add_argument("out", help="package folder to write")
    p.add_argument("--best", action="store_true", help="take the Pareto-front trial best for --objective")
    p.add_argument("--objective", default="quality",
                   help="quality (default), throughput, memory or balanced, among the trials meeting the constraint "
                        "profile's latency and model-size limits")
    p.add_argument("--experiment", help="experiment name or dataset folder for --best (default: newest search)")
    p.add_argument("--false-alarm-rate", type=_rate, default=DEFAULT_FALSE_ALARM_RATE,
                   help=f"target rate on normal images (default {DEFAULT_FALSE_ALARM_RATE:g})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.add_argument("--overwrite", action="store_true", help="replace an automl-ad package (never another folder)")
    p.add_argument("--mlflow", action="store_true", help="also log the package as an MLflow pyfunc model to serve")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="one self-contained HTML report of a search: profile, recommendation, trials, "
                       "Pareto front, test scores, curves, heatmaps")
    p.add_argument("target", nargs="?",
                   help="search run id, experiment name or dataset folder (default: newest search)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default %(default)s)")
    p.add_argument("--max-images", type=_at_least_one, default=200,
                   help="most test images to score (default %(default)s)")
    p.add_argument("--false-alarm-rate", type=_rate, default=DEFAULT_FALSE_ALARM_RATE,
                   help=f"threshold target on normals (default {DEFAULT_FALSE_ALARM_RATE:g})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="score images with a package: verdicts, heatmaps, masks, CSV/JSON summary")
    p.add_argument("package", help="folder written by `automl-ad export`")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, help="image threshold instead of the package's calibrated one")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier predict's results in --out")
    p.add_argument("--json", action="store_true", help="print the per-image results as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="generate the built-in demo dataset and run the journey on it")
    p.add_argument("--out", default=str(Path(DEMO_DATA_DIR).parent), help="output folder (default %(default)s)")
    p.add_argument("--profile", help="constraint profile YAML for the recommendation")
    p.add_argument("--top", type=_at_least_one, default=SHORTLIST_SIZE,
                   help=f"shortlist size (default {SHORTLIST_SIZE}; ties within {SHORTLIST_TIE_POINTS:g} points join)")
    p.add_argument("--seed", type=_non_negative, default=0, help="demo data seed")
    p.add_argument("--budget", default="3m", help="budget of the demo search (0 = recommend only; default %(default)s)")
    p.add_argument("--weights", help="local backbone weights file, so backbone families can run offline")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(fallback, message, category, filename, lineno, file=None, line=None) -> None:
    """A warning raised in automl-ad's own code reads as one ``warning: ...`` line on stderr (no source file and
    line); other libraries' go to ``fallback`` (Python's format)."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        fallback(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    previous = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, previous)
    try:
        return args.func(args)
    except AutomlAdError as exc:
        if args.verbose and exc.__cause__ is not None:  # where a wrapped failure came from
            log.info("details:", exc_info=exc.__cause__)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
        print(f"error: {exc.strerror}: {exc.filename or '(no file name given)'}. Check that this file or folder may "
              "be read and written (not a read-only file system) and that its disk has free space", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
