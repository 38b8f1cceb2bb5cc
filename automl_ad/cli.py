"""The ``automl-ad`` command line: a thin front over the library. Heavy modules load inside the commands.

Exit codes: 0 success, 1 unexpected error, 2 usage or configuration error, 3 data problems.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DATA = 0, 1, 2, 3

log = logging.getLogger("automl_ad")


def _port(text: str) -> int:
    """argparse type: a TCP port number (1-65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; use 1-65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a valid port; use 1-65535")
    return port


def _at_least_one(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _rate(text: str) -> float:
    """argparse type: a rate strictly between 0 and 1 (e.g. 0.01 for 1%)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < rate < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (0.01 = 1%), got {text}")
    return rate


def _non_negative(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _check_output_path(out: str | Path, kind: str | None = None) -> Path:
    """Raise UsageError, before any long work, when ``out`` cannot be written as a ``kind`` ("file" or "folder"; None:
    either): it exists as the other kind, or a path component above it is a file. Missing folders are created."""
    from automl_ad.errors import UsageError

    out = Path(out)
    if kind == "folder" and out.exists() and not out.is_dir():
        raise UsageError(f"{out} is an existing file; give a folder path")
    if kind == "file" and out.is_dir():
        raise UsageError(f"{out} is a folder; give the path of the file to write")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write {out}: {blocking} is a file, not a folder")
    return out


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _open_all(data: str, category: str | None, strict: bool, progress: bool):
    from automl_ad.data import load_datasets

    root = Path(data) / category if category else Path(data)
    return load_datasets(root, strict=strict, progress=progress)


def _state_path() -> Path:
    from automl_ad.defaults import STATE_DIR

    return Path.cwd() / STATE_DIR


def _save_state(results: list[tuple], constraints_source: str | None, data: str) -> Path:
    """Keep profiles and recommendations in the working directory so later steps (search) can pick them up."""
    state_dir = _state_path()
    entries = []
    for profile, recommendation in results:
        profile_file = profile.save(state_dir / f"{profile.name}-{profile.fingerprint}" / "profile.json")
        rec_file = recommendation.save(profile_file.parent / "recommendation.json")
        entries.append({"dataset": profile.root, "category": profile.name, "fingerprint": profile.fingerprint,
                        "profile": str(profile_file), "recommendation": str(rec_file),
                        "shortlist": recommendation.shortlist})
    state = {"data": str(Path(data).resolve()), "constraints": constraints_source, "categories": entries}
    state_file = state_dir / "state.json"
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file)
    return state_file


def _print_profile(console, profile) -> None:
    from rich.markup import escape

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
                  f"{'/'.join(map(str, profile.color.bit_depths))}")
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
    from rich.markup import escape
    from rich.table import Table

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
    from automl_ad.constraints import load_constraints
    from automl_ad.profiling import profile_dataset
    from automl_ad.recommend import recommend

    constraints = load_constraints(args.profile)
    datasets = _open_all(args.data, args.category, args.strict, progress=not args.json)
    results = []
    for dataset in datasets:
        profile = profile_dataset(dataset)
        if constraints.data:
            profile = profile.with_overrides(constraints.data)
        results.append((profile, recommend(profile, constraints, top=args.top, weights=args.weights)))
    state_file = _save_state(results, constraints.source, args.data)
    if args.json:
        payload = [{"profile": p.to_dict(), "recommendation": r.to_dict(),
                    "problems": [x.to_dict() for x in d.problems]} for d, (p, r) in zip(datasets, results)]
        print(json.dumps({"categories": payload, "state": str(state_file)}, indent=2))
        return EXIT_OK
    console = _console()
    for dataset, (profile, recommendation) in zip(datasets, results):
        _print_problems(console, dataset.problems)
        _print_profile(console, profile)
        _print_recommendation(console, recommendation)
        console.print()
    console.print(f"Saved profile and recommendation under {state_file.parent} "
                  "(a later `automl-ad search` picks them up).")
    return EXIT_OK


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
    from automl_ad.profiling import profile_dataset

    if args.out:
        _check_output_path(args.out)
    datasets = _open_all(args.data, args.category, args.strict, progress=not args.json)
    profiles = [profile_dataset(d) for d in datasets]
    if args.out:
        out = Path(args.out)
        for profile in profiles:
            profile.save(out / f"{profile.name}.json" if len(profiles) > 1 or out.suffix != ".json" else out)
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
        return EXIT_OK
    console = _console()
    for dataset, profile in zip(datasets, profiles):
        _print_problems(console, dataset.problems)
        _print_profile(console, profile)
        console.print(f"  profiled in {profile.profiling_seconds:.1f} s")
    return EXIT_OK


def cmd_demo(args) -> int:
    from automl_ad.data.demo import generate_demo

    out = Path(args.out)
    data_dir = out / "data"
    console = _console()
    console.print(f"Generating the built-in demo dataset in {data_dir} ...")
    generate_demo(data_dir, seed=args.seed)
    console.print(f"Recommending routes for each demo category (constraint profile: {args.profile or 'default'}):\n")
    rec_args = argparse.Namespace(data=str(data_dir), category=None, strict=False, json=False, top=args.top,
                                  profile=args.profile, weights=args.weights)
    code = cmd_recommend(rec_args)
    if code != EXIT_OK or args.budget in ("0", "0s"):
        return code
    category = data_dir / "texture"
    console.print(f"\nSearching the recommended families on {category} for {args.budget} ...")
    search_args = argparse.Namespace(data=str(category), category=None, profile=args.profile, families=None,
                                     weights=args.weights, budget=args.budget, max_trials=None, seed=args.seed,
                                     metric="combined", validation="auto", tracking_uri=None, address=None,
                                     resume=False, trial_timeout=None)
    code = cmd_search(search_args)
    if code != EXIT_OK:
        return code
    package, predictions = out / "package", out / "predictions"
    console.print(f"\nExporting the most balanced model of the Pareto front to {package} ...")
    code = cmd_export(argparse.Namespace(run_id=None, out=str(package), best=True, objective="balanced",
                                         experiment=None, false_alarm_rate=0.01, tracking_uri=None, overwrite=True,
                                         mlflow=False))
    if code != EXIT_OK:
        return code
    console.print(f"\nPredicting the demo test images with the package into {predictions} ...")
    code = cmd_predict(argparse.Namespace(package=str(package), inputs=[str(category / "test")],
                                          out=str(predictions), threshold=None, json=False))
    if code != EXIT_OK:
        return code
    report = out / "report.html"
    code = cmd_report(argparse.Namespace(target=None, out=str(report), tracking_uri=None, max_images=200,
                                         false_alarm_rate=0.01))
    console.print(f"\nDemo data: {data_dir}\nPackage: {package}\nPredictions: {predictions}\nReport: {report}\n"
                  "Browse the search: automl-ad ui   |   ranked trials: automl-ad leaderboard --pareto\n"
                  f"Try: automl-ad recommend {data_dir}/object --profile profiles/edge-cpu.yaml, then "
                  "automl-ad search --budget 10m")
    return code


def cmd_search(args) -> int:
    from automl_ad.constraints import parse_duration
    from automl_ad.defaults import SEARCH_BUDGET
    from automl_ad.search.engine import check_search_limits, check_store_free, run_search
    from automl_ad.search.plan import plan_search

    console = _console()
    budget_s = parse_duration(args.budget) if args.budget else None if args.resume else parse_duration(SEARCH_BUDGET)
    check_search_limits(budget_s, args.max_trials, args.trial_timeout, args.resume)  # before the slow planning
    check_store_free(args.tracking_uri)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    request = plan_search(args.data, args.category, args.profile, families, args.weights,
                          say=lambda text: console.print(text, markup=False),
                          budget_s=budget_s, max_trials=args.max_trials, seed=args.seed,
                          metric=args.metric, validation=args.validation, tracking_uri=args.tracking_uri,
                          address=args.address, resume=args.resume, trial_timeout_s=args.trial_timeout)
    result = run_search(request, console=console)
    ok = [t for t in result.trials if t.get("status") == "ok"]
    console.print(f"\n{len(result.trials)} trials ({len(ok)} complete); Pareto front of {len(result.front)}:")
    _print_leaderboard(console, result.front)
    console.print(f"\nTracking store: {result.tracking_uri} (experiment '{result.experiment}', search run "
                  f"{result.parent_run_id}).\nCompare: automl-ad leaderboard '{result.experiment}' "
                  "--pareto   |   browse: automl-ad ui")
    return EXIT_OK


_BOARD_COLUMNS = (("family", "family"), ("quality", "quality"), ("throughput", "img/s"), ("memory_mb", "MB"),
                  ("latency_ms_p50", "p50 ms"), ("fit_seconds", "fit s"), ("pareto_rank", "rank"), ("run_id", "run"))


def _print_leaderboard(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table()
    for _, title in _BOARD_COLUMNS:
        table.add_column(title)
    for row in sorted(rows, key=lambda r: -(r.get("quality") or 0)):
        cells = []
        for key, _ in _BOARD_COLUMNS:
            value = row.get(key)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "-"))
        table.add_row(*cells)
    console.print(table)


def cmd_leaderboard(args) -> int:
    from automl_ad.tracking.board import leaderboard

    rows = leaderboard(args.target, tracking_uri=args.tracking_uri, pareto=args.pareto)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_leaderboard(_console(), rows)
    return EXIT_OK


def _check_port_free(host: str, port: int) -> None:
    """Raise UsageError when nothing may listen on ``host:port`` (another program holds it, or it is privileged)."""
    import errno
    import socket

    from automl_ad.errors import UsageError

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
    import os
    import signal
    import time

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
    import os
    import signal
    import subprocess

    from automl_ad.defaults import UI_HOST, UI_STOP_GRACE_S
    from automl_ad.errors import UsageError
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
    from automl_ad.deploy.export import choose_run, export_run
    from automl_ad.errors import UsageError
    from automl_ad.tracking.store import Tracker

    tracker = Tracker(args.tracking_uri)
    if args.best == bool(args.run_id):
        raise UsageError("give either a RUN_ID or --best (with --objective), not both or neither")
    run_id = choose_run(tracker, args.experiment, args.objective) if args.best else args.run_id
    console = _console()
    path = export_run(tracker, run_id, args.out, far=args.false_alarm_rate, overwrite=args.overwrite,
                      say=lambda text: console.print(text, markup=False))
    manifest = json.loads((path / "manifest.json").read_text())
    image = manifest["thresholds"]["image"]
    console.print(f"Exported run {run_id} ({manifest['family']}) to {path}; image threshold {image['value']:.4g} "
                  f"({image['method']}, target false-alarm rate {image['target_false_alarm_rate']:g}).")
    test = manifest["metrics"].get("test")
    if test:
        console.print(f"Test set (never used for selection): image AUROC {test.get('image_auroc')}, AUPRO "
                      f"{test.get('aupro')}, false alarms {test.get('false_alarm_rate')}, detections "
                      f"{test.get('detection_rate')} at that threshold.")
    if args.mlflow:
        from automl_ad.tracking.serving import log_package

        uri = log_package(path, tracker.uri, run_id)
        console.print(f"Logged as MLflow model {uri}. Serve it: MLFLOW_TRACKING_URI={tracker.uri} mlflow models serve "
                      f"-m {uri} --env-manager local -p 5001, then POST {{\"inputs\": [\"<base64 image file>\"]}} "
                      "to http://127.0.0.1:5001/invocations")
    console.print(f"Next: automl-ad predict {path} IMAGES --out predictions/")
    return EXIT_OK


def cmd_report(args) -> int:
    from automl_ad.reporting.html_report import write_report

    _check_output_path(args.out, "file")
    console = _console()
    path = write_report(args.target, args.out, tracking_uri=args.tracking_uri, max_images=args.max_images,
                        far=args.false_alarm_rate, say=lambda text: console.print(text, markup=False))
    console.print(f"Report written to {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in a browser).")
    return EXIT_OK


def cmd_predict(args) -> int:
    from automl_ad.deploy.package import load_package
    from automl_ad.deploy.predict import predict_files

    package = load_package(args.package)
    rows = predict_files(package, args.inputs, args.out, args.threshold, progress=not args.json)
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
                  "(predictions.csv, predictions.json, overlays/, masks/).")
    return EXIT_OK


def _parse_params(items: list[str]) -> dict:
    """``k=v`` pairs; values are read as YAML scalars/lists (0.1, true, [8, 16], resnet18)."""
    from automl_ad.errors import UsageError
    from automl_ad.safe_yaml import load_yaml_text

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects key=value, got {item!r}")
        parsed = load_yaml_text(value, f"--param {key}") if value else None
        params[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return params


#: What ``fit --out`` holds: the saved detector, its fit record and ``evaluate``'s default output folder.
_MODEL_FOLDER_ENTRIES = ("detector.json", "tensors.safetensors", "fit.json", "evaluation")


def _saved_model_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a model written by ``fit`` (None when it is, so ``--overwrite`` may replace it)."""
    others = sorted(p.name for p in folder.iterdir() if p.name not in _MODEL_FOLDER_ENTRIES or p.is_symlink()
                    or p.is_dir() != (p.name == "evaluation"))
    if others:
        return f"it holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
    record = folder / "detector.json"
    try:
        saved = json.loads(record.read_text()) if record.stat().st_size < 64 << 20 else None
    except (OSError, UnicodeDecodeError, ValueError):
        saved = None
    if not (isinstance(saved, dict) and "format" in saved and "family" in saved):
        return "no detector.json of a saved detector"
    return None


@contextlib.contextmanager
def _blaming_params(family: str, params: dict):
    """Turn a ValueError/TypeError raised while a detector is built or fitted with the user's ``--param`` values into
    a UsageError naming them; the original exception stays chained (``--verbose`` prints it)."""
    from automl_ad.errors import AutomlAdError, UsageError

    try:
        yield
    except AutomlAdError:
        raise
    except (ValueError, TypeError) as exc:
        if not params:
            raise
        given = ", ".join(f"{key}={value!r}" for key, value in params.items())
        raise UsageError(f"{family} failed with your parameters ({given}): {type(exc).__name__}: {exc}. Check these "
                         "values (`automl-ad --verbose fit ...` shows where it failed)") from exc


def _normal_folder(dataset) -> Path:
    """Where normal training images of ``dataset`` go in its layout."""
    return {"mvtec": dataset.root / "train" / "good", "plain": dataset.root / "good"}.get(dataset.layout, dataset.root)


def cmd_fit(args) -> int:
    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.defaults import MIN_TRAIN_IMAGES
    from automl_ad.detectors import create_detector
    from automl_ad.errors import InvalidDatasetError, UsageError
    from automl_ad.folders import check_output_folder, write_output_folder

    target = {"what": "model", "replaceable": _saved_model_problem, "overwrite": args.overwrite,
              "protected": (args.data, _state_path())}
    check_output_folder(args.out, **target)  # before fitting, which may take long
    params = _parse_params(args.param)
    with _blaming_params(args.family, params):
        detector = create_detector(args.family, **params)
    if args.weights:
        if "weights" not in detector.get_params():
            raise UsageError(f"{args.family} uses no pretrained backbone; drop --weights")
        if not Path(args.weights).is_file():
            raise UsageError(f"--weights {args.weights} is not a file; pass a timm state_dict (.safetensors or .pth)")
        detector.set_params(weights=str(Path(args.weights).resolve()))
    elif args.profile and "backbone" in detector.get_params():
        from automl_ad.constraints import load_constraints

        local = load_constraints(args.profile).backbone_weights.get(detector.get_params()["backbone"])
        if local:
            detector.set_params(weights=local)
    dataset = open_dataset(args.data, category=args.category, strict=args.strict, progress=True)
    split = dataset.holdout_split()
    train = ImageSet.from_records(split.train, dataset)
    if len(train) < MIN_TRAIN_IMAGES:
        raise InvalidDatasetError(f"{dataset.root}: {len(train)} normal image(s) to fit on, and fitting needs at least "
                                  f"{MIN_TRAIN_IMAGES}; add normal (defect-free) images to {_normal_folder(dataset)}")
    console = _console()
    console.print(f"Fitting {args.family} on {len(train)} normal images of {dataset.name} ...")
    with _blaming_params(args.family, params):
        detector.fit(train)
    record = {"dataset": str(dataset.root), "category": dataset.name, "fingerprint": dataset.fingerprint(),
              "n_train": len(train), "fit_seconds": detector.fit_seconds_, "peak_rss_mb": detector.fit_peak_rss_mb_}

    def save(folder: Path) -> None:
        detector.save(folder)
        (folder / "fit.json").write_text(json.dumps(record, indent=2))

    out = write_output_folder(args.out, save, **target)
    console.print(f"Fitted in {detector.fit_seconds_:.1f} s (peak memory {detector.fit_peak_rss_mb_:.0f} MB); "
                  f"saved to {out}. Next: automl-ad evaluate {out} {args.data}")
    return EXIT_OK


def _test_images_hint(dataset) -> str:
    """Where test images go in the layout of ``dataset``."""
    root = dataset.root
    if dataset.layout == "mvtec":
        return (f"Put normal test images in {root / 'test' / 'good'} and defective ones in "
                f"{root / 'test'}/<defect_type>/ (masks, optional, in {root / 'ground_truth'}/<defect_type>/"
                "<name>_mask.png).")
    if dataset.layout == "plain":
        return (f"In this layout the defect folders ({root}/<defect_type>/) and a fifth of {root / 'good'} are tested: "
                "add a folder of defective images or more normal images.")
    return (f"A flat folder holds only normal images and a fifth of them are tested; {len(dataset.normal)} are too "
            "few. Add images, or use the MVTec layout: train/good/, test/good/, test/<defect_type>/.")


def cmd_evaluate(args) -> int:
    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.detectors import Detector
    from automl_ad.errors import InvalidDatasetError, UsageError
    from automl_ad.evaluation.run import evaluate_detector
    from automl_ad.figures.heatmaps import save_overlays

    model_dir = Path(args.model)
    if not (model_dir / "detector.json").is_file():
        package = (model_dir / "manifest.json").is_file()
        raise UsageError(f"{model_dir} is not a model folder written by `automl-ad fit` (it has no detector.json)"
                         + ("; it is a package: score images with `automl-ad predict`" if package else ""))
    if args.out:
        _check_output_path(args.out, "folder")
    detector = Detector.load(model_dir)
    dataset = open_dataset(args.data, category=args.category, strict=args.strict, progress=not args.json)
    fit_record = model_dir / "fit.json"
    if fit_record.is_file() and json.loads(fit_record.read_text()).get("fingerprint") != dataset.fingerprint():
        log.warning("the model was fitted on other data than %s; test images may overlap its training images",
                    dataset.root)
    test = ImageSet.from_records(dataset.holdout_split().test, dataset)
    if not len(test):
        raise InvalidDatasetError(f"{dataset.root} has no test images to evaluate on. {_test_images_hint(dataset)}")
    result = evaluate_detector(detector, test, measure_cost=not args.no_cost)
    out = Path(args.out) if args.out else model_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"family": detector.name, "dataset": str(dataset.root), "n_test": len(test), **result.summary()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    overlays = []
    if result.anomaly_maps is not None:
        images = test.load(detector.input_size)
        overlays = save_overlays(out / "heatmaps", images, result.anomaly_maps, test.labels, result.image_scores,
                                 [str(p) for p in test.paths], test.masks())
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    console = _console()
    _print_evaluation(console, summary, out, overlays)
    if test.labels.min() == test.labels.max():
        present, missing = ("defective", "normal") if test.labels.min() else ("normal", "defective")
        console.print(f"Note: every test image is {present}, so the detection metrics are n/a; add {missing} test "
                      "images to measure them.", markup=False)
    return EXIT_OK


def _print_evaluation(console, summary: dict, out: Path, overlays: list) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['family']} on {summary['dataset']} ({summary['n_test']} test images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():
        table.add_row(key, "n/a" if value is None else f"{value:.4f}")
    units = {"fit_seconds": "s", "latency_ms_p50": "ms", "latency_ms_p95": "ms", "throughput_ips": "img/s",
             "peak_rss_mb_fit": "MB", "peak_rss_mb_score": "MB", "model_mb": "MB"}
    for key, unit in units.items():
        value = summary["cost"].get(key)
        table.add_row(key, "n/a" if value is None else f"{value:.1f} {unit}")
    console.print(table)
    console.print(f"Metrics saved to {out / 'metrics.json'}" + (f"; {len(overlays)} heatmaps in {out / 'heatmaps'}"
                                                                  if overlays else ""))


def build_parser() -> argparse.ArgumentParser:
    from automl_ad import __version__
    from automl_ad.defaults import DEMO_DATA_DIR, SEARCH_BUDGET, SHORTLIST_SIZE, UI_PORT

    parser = argparse.ArgumentParser(
        prog="automl-ad", description="Pick and tune the right industrial image anomaly-detection method.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 usage/configuration error, 3 data problems.")
    parser.add_argument("--version", action="version", version=f"automl-ad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(p):
        p.add_argument("data", help="dataset folder (MVTec style, plain good/ + defect folders, flat, or a root of categories)")
        p.add_argument("--category", help="only this category of a multi-category root")
        p.add_argument("--strict", action="store_true", help="fail on any bad file instead of skipping it")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    p = sub.add_parser("recommend", help="profile the data, rank the 14 routes, explain why, shortlist for search")
    data_args(p)
    p.add_argument("--profile", help="constraint profile YAML (see profiles/); default: this machine, accuracy first")
    p.add_argument("--top", type=_at_least_one, default=SHORTLIST_SIZE,
                   help=f"shortlist size (default {SHORTLIST_SIZE})")
    p.add_argument("--weights", help="local backbone weights file (as for search): offline, only backbones with "
                   "weights here are proposed")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("profile", help="validate the data and print its profile (counts, texture/object, alignment)")
    data_args(p)
    p.add_argument("--out", help="write the profile JSON here (a file, or a folder for several categories)")
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
    p.add_argument("--trial-timeout", type=float, help="seconds one trial may take (default: a quarter of the budget)")
    p.add_argument("--metric", default="combined", help="quality metric: combined (image AUROC + AUPRO), image_auroc, "
                   "aupro, pixel_auroc, pixel_ap, image_f1_max")
    p.add_argument("--validation", default="auto", choices=("auto", "real", "synthetic"),
                   help="rank on labelled defects (real) or synthetic anomalies; auto = real when there are any")
    p.add_argument("--weights", help="local backbone weights file for offline use")
    p.add_argument("--address", help="Ray cluster: auto or ray://host:port (default: a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.add_argument("--resume", action="store_true", help="continue the last search of this dataset from this "
                   "working directory (remaining budget; trials a killed search lost run again)")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--objective", default="balanced", help="quality, throughput, memory or balanced (default)")
    p.add_argument("--experiment", help="experiment name or dataset folder for --best (default: newest search)")
    p.add_argument("--false-alarm-rate", type=_rate, default=0.01, help="target rate on normal images (default 0.01)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.add_argument("--overwrite", action="store_true", help="replace an automl-ad package (never another folder)")
    p.add_argument("--mlflow", action="store_true", help="also log the package as an MLflow pyfunc model to serve")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="one self-contained HTML report of a search: profile, recommendation, trials, "
                       "Pareto front, test scores, curves, heatmaps")
    p.add_argument("target", nargs="?", help="search run id, experiment name or dataset folder (default: newest search)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default %(default)s)")
    p.add_argument("--max-images", type=_at_least_one, default=200,
                   help="most test images to score (default %(default)s)")
    p.add_argument("--false-alarm-rate", type=_rate, default=0.01, help="threshold target on normals (default 0.01)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite .automl-ad/mlflow.db here)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="score images with a package: verdicts, heatmaps, masks, CSV/JSON summary")
    p.add_argument("package", help="folder written by `automl-ad export`")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, help="image threshold instead of the package's calibrated one")
    p.add_argument("--json", action="store_true", help="print the per-image results as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="generate the built-in demo dataset and run the journey on it")
    p.add_argument("--out", default=str(Path(DEMO_DATA_DIR).parent), help="output folder (default %(default)s)")
    p.add_argument("--profile", help="constraint profile YAML for the recommendation")
    p.add_argument("--top", type=_at_least_one, default=SHORTLIST_SIZE, help="shortlist size")
    p.add_argument("--seed", type=_non_negative, default=0, help="demo data seed")
    p.add_argument("--budget", default="3m", help="budget of the demo search (0 = recommend only; default %(default)s)")
    p.add_argument("--weights", help="local backbone weights file, so backbone families can run offline")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    from automl_ad.errors import AutomlAdError

    try:
        return args.func(args)
    except AutomlAdError as exc:
        if args.verbose and exc.__cause__ is not None:  # where a wrapped failure came from
            log.info("details:", exc_info=exc.__cause__)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
