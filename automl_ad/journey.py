"""The user's journey as library functions: profile, recommend, fit, evaluate, search and the demo that chains
them. Each CLI command parses its arguments and calls one of these (or one function of a lower layer), so the
same steps run from Python, and a new option cannot break the demo at run time."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.constraints import load_constraints, parse_duration
from automl_ad.data import load_datasets, open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.data.layout import NORMAL_LABEL, category_root, normal_folder
from automl_ad.defaults import MIN_TRAIN_IMAGES, SCREEN_FAMILY, SCREEN_FOLDS, SEARCH_BUDGET
from automl_ad.deploy.export import Export, export_model
from automl_ad.deploy.package import load_package
from automl_ad.deploy.predict import predict_files
from automl_ad.detectors import Detector, create_detector
from automl_ad.errors import AutomlAdError, InvalidDatasetError, UsageError
from automl_ad.evaluation.run import evaluate_detector
from automl_ad.features.backbone import backbone_fallback, backbone_of_weights, uses_builtin_weights
from automl_ad.figures.heatmaps import save_overlays
from automl_ad.folders import check_output_folder, write_output_folder
from automl_ad.profiling import profile_dataset, profile_paths, save_profiles
from automl_ad.recommend import recommend
from automl_ad.recommend.engine import local_weights
from automl_ad.recommend.state import SCREEN_FILE, category_dir, save_state
from automl_ad.reporting.html_report import write_report
from automl_ad.screening import NormalScreen, screen_normals
from automl_ad.search.engine import run_search
from automl_ad.search.plan import plan_search
from automl_ad.search.request import SearchResult
from automl_ad.search.space import searchable_families
from automl_ad.workspace import state_dir

#: What ``fit --out`` holds: the saved detector, its fit record and ``evaluate``'s default output folder.
MODEL_FOLDER_ENTRIES = ("detector.json", "tensors.safetensors", "fit.json", "evaluation")


# --- profile and recommend ----------------------------------------------------------------------------------------
@dataclass
class Recommended:
    """Each category of a data folder with its profile and recommendation, and where the state was saved."""

    datasets: list
    profiles: list
    recommendations: list
    state_file: Path | None = None
    screens: list[NormalScreen | None] = field(default_factory=list)  # per category; None when not screened


def open_categories(data: str, category: str | None = None, strict: bool = False, progress: bool = False) -> list:
    """Every category of ``data`` (or the named one), validated."""
    return load_datasets(category_root(data, category), strict=strict, progress=progress)


def profile_data(data: str, category: str | None = None, strict: bool = False, progress: bool = False,
                 out: str | None = None) -> Recommended:
    """Profile every category; with ``out``, save the profiles (one JSON file, or one per category in a folder)."""
    datasets = open_categories(data, category, strict, progress)
    if out:
        profile_paths(out, [d.name for d in datasets])  # refuse a bad --out before the work
    profiles = [profile_dataset(d) for d in datasets]
    if out:
        save_profiles(profiles, out)
    return Recommended(datasets, profiles, [])


def recommend_data(data: str, category: str | None = None, profile: str | None = None, weights: str | None = None,
                   top: int | None = None, strict: bool = False, progress: bool = False,
                   screen: bool = False) -> Recommended:
    """Profile and rank the routes for every category, and leave the results for a later `search`; with ``screen``
    also name the good images that look unlike the others (:mod:`automl_ad.screening`), saved as ``screen.json``
    beside the recommendation."""
    constraints = load_constraints(profile)
    datasets = open_categories(data, category, strict, progress)
    profiles, recommendations = [], []
    for dataset in datasets:
        facts = profile_dataset(dataset)
        if constraints.data:
            facts = facts.with_overrides(constraints.data)
        profiles.append(facts)
        options = {"top": top} if top else {}
        recommendations.append(recommend(facts, constraints, weights=weights, families=searchable_families(),
                                         **options))
    state_file = save_state(list(zip(profiles, recommendations)), constraints.source, data)
    screens = []
    local = local_weights(constraints, weights)
    for dataset, facts, recommendation in zip(datasets, profiles, recommendations):
        saved = category_dir(facts) / SCREEN_FILE
        if not screen:
            saved.unlink(missing_ok=True)  # an earlier screen's names must not outlive this recommendation
            screens.append(None)
            continue
        backbone = recommendation.backbones[0] if recommendation.backbones else None  # the lightest with weights
        try:
            result = screen_normals(dataset, backbone, local.get(backbone), progress=progress)
        except Exception as exc:
            logging.getLogger(__name__).info("screening %s failed", dataset.root, exc_info=True)
            result = NormalScreen(SCREEN_FAMILY, backbone, SCREEN_FOLDS,
                                  skipped=f"it failed: {type(exc).__name__}: {exc} (--verbose shows where)")
        result.save(saved)
        screens.append(result)
    return Recommended(datasets, profiles, recommendations, state_file, screens)


# --- fit and evaluate ---------------------------------------------------------------------------------------------
@dataclass
class Fitted:
    detector: Detector
    dataset: object
    out: Path
    n_train: int
    notes: list[str] = field(default_factory=list)


def saved_model_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a model written by `fit` (None when it is, so ``overwrite`` may replace it)."""
    others = sorted(p.name for p in folder.iterdir() if p.name not in MODEL_FOLDER_ENTRIES or p.is_symlink()
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
def blaming_params(family: str, params: dict):
    """Turn a ValueError/TypeError raised while a detector is built or fitted with the user's parameters into a
    UsageError naming them; the original exception stays chained (``--verbose`` prints it)."""
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
    if dataset.layout not in ("mvtec", "plain"):
        return dataset.root
    parent = dataset.root / "train" if dataset.layout == "mvtec" else dataset.root
    return normal_folder(parent) or parent / NORMAL_LABEL


def _backbone_settings(family: str, params: dict, weights: str | None, profile: str | None) -> tuple[dict, list[str]]:
    """Backbone parameters implied by ``weights`` (a file the tool knows runs its own backbone unless the user
    chose one), the profile's ``backbone_weights``, or the built-in weights offline; and notes saying so."""
    defaults = create_detector(family).get_params()
    if "backbone" not in defaults:
        if weights:
            raise UsageError(f"{family} uses no pretrained backbone; drop --weights")
        return {}, []
    backbone = params.get("backbone", defaults["backbone"])
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights} is not a file; pass a timm state_dict (.safetensors or .pth)")
        known = backbone_of_weights(weights)
        notes = []
        if known and known != backbone and "backbone" not in params:
            notes.append(f"--weights holds {known} weights: {family} uses backbone {known} instead of its default "
                         f"{backbone}")
            backbone = known
        return {"backbone": backbone, "weights": str(Path(weights).resolve())}, notes
    local_files = load_constraints(profile).backbone_weights if profile else {}
    local = local_files.get(backbone)
    if local:
        return {"weights": local}, []
    if uses_builtin_weights(backbone):
        return {}, [f"the hub is unreachable: {backbone} runs on the ImageNet weights built into automl-ad"]
    fallback = None if "backbone" in params else backbone_fallback(family, backbone, local_files)
    if fallback:
        settings, note = fallback
        return settings, [note]
    return {}, []


def fit_model(data: str, family: str, out: str, params: dict | None = None, category: str | None = None,
              weights: str | None = None, profile: str | None = None, strict: bool = False,
              overwrite: bool = False, say=print) -> Fitted:
    """Fit ``family`` on the normal training images of ``data`` and save it to ``out`` (replacing only an earlier
    saved model, with ``overwrite``)."""
    params = dict(params or {})
    target = {"what": "model", "replaceable": saved_model_problem, "overwrite": overwrite,
              "protected": (data, state_dir())}
    check_output_folder(out, **target)  # before fitting, which may take long
    backbone, notes = _backbone_settings(family, params, weights, profile)
    with blaming_params(family, params):
        detector = create_detector(family, **{**params, **backbone})
    dataset = open_dataset(data, category=category, strict=strict, progress=True)
    train = ImageSet.from_records(dataset.holdout_split().train, dataset)
    if len(train) < MIN_TRAIN_IMAGES:
        raise InvalidDatasetError(f"{dataset.root}: {len(train)} normal image(s) to fit on, and fitting needs at least "
                                  f"{MIN_TRAIN_IMAGES}; add normal (defect-free) images to {_normal_folder(dataset)}")
    for note in notes:
        say(f"note: {note}")
    say(f"Fitting {family} on {len(train)} normal images of {dataset.name} ...")
    with blaming_params(family, params):
        detector.fit(train)
    record = {"dataset": str(dataset.root), "category": dataset.name, "fingerprint": dataset.fingerprint(),
              "n_train": len(train), "fit_seconds": detector.fit_seconds_, "peak_rss_mb": detector.fit_peak_rss_mb_}

    def save(folder: Path) -> None:
        detector.save(folder)
        (folder / "fit.json").write_text(json.dumps(record, indent=2))

    return Fitted(detector, dataset, write_output_folder(out, save, **target), len(train), notes)


def _test_images_hint(dataset) -> str:
    """Where test images go in the layout of ``dataset``."""
    root = dataset.root
    if dataset.layout == "mvtec":
        return (f"Put normal test images in {root / 'test' / 'good'} and defective ones in "
                f"{root / 'test'}/<defect_type>/ (masks, optional, in {root / 'ground_truth'}/<defect_type>/"
                "<name>_mask.png).")
    if dataset.layout == "plain":
        return (f"In this layout the defect folders ({root}/<defect_type>/) and a fifth of {_normal_folder(dataset)} "
                "are tested: add a folder of defective images or more normal images.")
    return (f"A flat folder holds only normal images and a fifth of them are tested; {len(dataset.normal)} are too "
            "few. Add images, or use the MVTec layout: train/good/, test/good/, test/<defect_type>/.")


@dataclass
class Evaluated:
    summary: dict
    out: Path
    overlays: list
    labels: object
    warnings: list[str] = field(default_factory=list)


def evaluate_model(model: str, data: str, out: str | None = None, category: str | None = None,
                   strict: bool = False, measure_cost: bool = True, progress: bool = False) -> Evaluated:
    """Score the held-out test images of ``data`` with the model `fit` saved in ``model``; metrics, costs and
    heatmap overlays go to ``out`` (default: ``model/evaluation``)."""
    model_dir = Path(model)
    if not (model_dir / "detector.json").is_file():
        package = (model_dir / "manifest.json").is_file()
        raise UsageError(f"{model_dir} is not a model folder written by `automl-ad fit` (it has no detector.json)"
                         + ("; it is a package: score images with `automl-ad predict`" if package else ""))
    detector = Detector.load(model_dir)
    dataset = open_dataset(data, category=category, strict=strict, progress=progress)
    warnings = []
    fit_record = model_dir / "fit.json"
    if fit_record.is_file() and json.loads(fit_record.read_text()).get("fingerprint") != dataset.fingerprint():
        warnings.append(f"the model was fitted on other data than {dataset.root}; test images may overlap its "
                        "training images")
    test = ImageSet.from_records(dataset.holdout_split().test, dataset)
    if not len(test):
        raise InvalidDatasetError(f"{dataset.root} has no test images to evaluate on. {_test_images_hint(dataset)}")
    result = evaluate_detector(detector, test, measure_cost=measure_cost)
    out_dir = Path(out) if out else model_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"family": detector.name, "dataset": str(dataset.root), "n_test": len(test), **result.summary()}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    overlays = []
    if result.anomaly_maps is not None:
        images = test.load(detector.input_size)
        overlays = save_overlays(out_dir / "heatmaps", images, result.anomaly_maps, test.labels, result.image_scores,
                                 [str(p) for p in test.paths], test.masks())
    return Evaluated(summary, out_dir, overlays, test.labels, warnings)


# --- search -------------------------------------------------------------------------------------------------------
def search_data(data: str | None, category: str | None = None, profile: str | None = None,
                families: list[str] | None = None, weights: str | None = None,
                budget: str | float | None = SEARCH_BUDGET, say=print, console=None, **options) -> SearchResult:
    """Plan the search (the last recommendation's shortlist, or a fresh one) and run it. ``budget`` None with
    ``resume=True``: the resumed search keeps its own budget."""
    request = plan_search(data, category, profile, families, weights, say=say,
                          budget_s=None if budget is None else parse_duration(budget), **options)
    return run_search(request, console=console)


# --- the demo -----------------------------------------------------------------------------------------------------
@dataclass
class Demo:
    data: Path
    recommended: Recommended
    search: SearchResult | None = None
    export: Export | None = None
    predictions: list[dict] | None = None
    report: Path | None = None


def run_demo(out: str | Path = "automl-ad-demo", budget: str = "3m", profile: str | None = None,
             weights: str | None = None, seed: int = 0, top: int | None = None, say=print,
             show_recommended=None, console=None) -> Demo:
    """Generate the built-in demo data, recommend routes for it, search the texture category for ``budget``,
    export the most accurate front model, predict the test images with it and write the HTML report.
    ``show_recommended(Recommended)`` displays the recommendation (the CLI prints tables)."""
    out = Path(out)
    data_dir = out / "data"
    say(f"Generating the built-in demo dataset in {data_dir} ...")
    generate_demo(data_dir, seed=seed)
    say(f"Recommending routes for each demo category (constraint profile: {profile or 'default'}):\n")
    recommended = recommend_data(str(data_dir), profile=profile, weights=weights, top=top)
    if show_recommended is not None:
        show_recommended(recommended)
    demo = Demo(data_dir, recommended)
    if budget in ("0", "0s"):
        return demo
    category = data_dir / "texture"
    say(f"\nSearching the recommended families on {category} for {budget} ...")
    demo.search = search_data(str(category), profile=profile, weights=weights, budget=budget, seed=seed, say=say,
                              console=console)
    package, predictions = out / "package", out / "predictions"
    say(f"\nExporting the most accurate model of the Pareto front to {package} ...")
    demo.export = export_model(package, target=demo.search.parent_run_id, objective="quality", overwrite=True,
                               say=say)
    say(f"\nPredicting the demo test images with the package into {predictions} ...")
    demo.predictions = predict_images(package, [str(category / "test")], predictions, overwrite=True)
    demo.report = write_report(demo.search.parent_run_id, out / "report.html", say=say)
    return demo


def predict_images(package: str | Path, inputs: list[str], out: str | Path, threshold: float | None = None,
                   progress: bool = False, overwrite: bool = False) -> list[dict]:
    """Verify and load the package, then score every image of ``inputs`` (files or folders) into ``out``
    (``overwrite``: replacing an earlier predict's results there)."""
    return predict_files(load_package(package), inputs, out, threshold, progress=progress, overwrite=overwrite)
