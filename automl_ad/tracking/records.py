"""Searches and trials read back from the tracking store as typed records: the one reader that export, report,
leaderboard and serving use, so no other package handles MLflow runs or their string tags. Everything a
search needs later (its data split, the saved trial models) is read from the store, so it works from any
working directory given the tracking URI."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from automl_ad.data.geometry import geometry_label
from automl_ad.data.split import SearchSplit
from automl_ad.data.synthetic import validation_folder
from automl_ad.defaults import IO_WORKERS
from automl_ad.errors import DataChangedError, InvalidDatasetError, UsageError
from automl_ad.evaluation.objectives import OBJECTIVE_METRICS
from automl_ad.tracking.store import Tracker
from automl_ad.workspace import dataset_experiment

#: Artifact of the search run holding the data split its trials used (paths, labels, masks).
SPLIT_ARTIFACT = "search/split.json"
#: How many gone or changed files a :class:`~automl_ad.errors.DataChangedError` names (the rest are counted).
NAMED_FILES = 5


@dataclass(frozen=True)
class SearchRecord:
    """A search (the parent run): where its data came from and how it was split and ranked."""

    run_id: str
    experiment: str
    data: str
    seed: int
    metric: str
    validation_kind: str
    families: list[str]
    work_dir: str | None
    fingerprint: str
    dataset_name: str
    start_time: int  # ms since the epoch
    params: dict = field(repr=False)
    #: False while its run is open: the search is running, or its process was killed before it ended.
    ended: bool = True

    @property
    def limits(self) -> dict[str, float]:
        """The deployment limits of the search's constraint profile (``latency_ms``, ``model_mb``; may be empty)."""
        return _value(self.params.get("limits", "{}")) or {}


@dataclass(frozen=True)
class TrialRecord:
    """One trial (a child run): family, parameters, outcome, metrics and its place on the Pareto front."""

    run_id: str
    search_id: str
    trial: str
    family: str
    route: str
    status: str
    default_config: bool
    pareto_rank: int | None
    params: dict
    metrics: dict[str, float]
    failure_reason: str | None = None
    error: str | None = None
    node: str | None = None

    @property
    def quality(self) -> float | None:
        return self.metrics.get("quality")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def on_front(self) -> bool:
        return self.pareto_rank == 0

    @property
    def complete(self) -> bool:
        """Finished with every objective measured (it can be ranked)."""
        return self.ok and all(m in self.metrics for m in OBJECTIVE_METRICS)

    @property
    def geometry(self) -> dict:
        """How the trial's model sees an image: the network input size and the parameters that shape it."""
        return {k: v for k, v in self.params.items() if k in ("input_size", "geometry", "tile", "gray")}

    def row(self) -> dict:
        """A flat dictionary for tables and JSON output."""
        return {"run_id": self.run_id, "search_id": self.search_id, "trial": self.trial, "family": self.family,
                "route": self.route, "status": self.status, "default_config": self.default_config,
                "pareto_rank": self.pareto_rank, "failure_reason": self.failure_reason, "error": self.error,
                "node": self.node, "params": self.params, "input": geometry_label(self.params), **self.metrics}


def _value(text: str):
    """A logged parameter back as a value: JSON where it parses (lists, numbers), booleans and None, else text."""
    special = {"True": True, "False": False, "None": None}
    if text in special:
        return special[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


class SearchStore:
    """Read-only access to the searches in one tracking store."""

    def __init__(self, tracking_uri: str | None = None, tracker: Tracker | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar for each small download
        self.tracker = tracker or Tracker(tracking_uri)
        self.uri = self.tracker.uri

    # --- searches ---------------------------------------------------------------------------------------------
    def resolve(self, target: str | None = None) -> SearchRecord:
        """The search meant by ``target``: a search run id (a trial's id gives its search), an experiment name or
        id, a dataset folder (its newest search), or None for the newest
        search in the store."""
        client = self.tracker.client
        if target is None:
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, filter_string="tags.`automl_ad.kind` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
            if not runs:
                raise UsageError(f"no search in {self.uri}; run `automl-ad search` first")
            return self.search(runs[0].info.run_id)
        if len(target) == 32 and all(c in "0123456789abcdef" for c in target.lower()):
            kind = self._kind(target)
            if kind == "search":
                return self.search(target)
            if kind == "trial":
                return self.search(self.trial(target).search_id)
            if kind is not None:
                raise UsageError(f"run {target} is neither a search nor a search trial")
        if Path(target).is_dir():
            return self.search(self.tracker.latest_search(dataset_experiment(target)))
        return self.search(self.tracker.latest_search(target))

    def _kind(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.tracker.client.get_run(run_id).data.tags.get("automl_ad.kind", "")
        except MlflowException:
            return None

    def _run(self, run_id: str, kind: str):
        """The MLflow run ``run_id``, which must be of ``kind`` ("search" or "trial")."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.tracker.client.get_run(run_id)
        except MlflowException as exc:
            raise UsageError(f"no run {run_id} in {self.uri}") from exc
        if run.data.tags.get("automl_ad.kind") != kind:
            raise UsageError(f"run {run_id} is not a {'search trial' if kind == 'trial' else kind}")
        return run

    def search(self, run_id: str) -> SearchRecord:
        run = self._run(run_id, "search")
        params = run.data.params
        return SearchRecord(run_id=run_id, experiment=self.tracker.client.get_experiment(run.info.experiment_id).name,
                            data=params.get("data", ""), seed=int(params.get("seed", 0)),
                            metric=params.get("metric", "combined"), validation_kind=params.get("validation", ""),
                            families=_value(params.get("families", "[]")), work_dir=params.get("work_dir"),
                            fingerprint=run.data.tags.get("fingerprint", ""),
                            dataset_name=run.data.tags.get("dataset", ""), start_time=run.info.start_time,
                            params=dict(params), ended=run.info.status != "RUNNING")

    def split(self, search: SearchRecord, check: bool = False, say=None) -> SearchSplit:
        """The data split the search's trials used, as logged with the search; with ``check`` its images are
        first checked to be those the search used (:func:`check_split_data`, which ``say`` hears notes from)."""
        data = self.artifact_json(search.run_id, SPLIT_ARTIFACT)
        if data is None:
            raise UsageError(f"search {search.run_id} has no logged data split ({SPLIT_ARTIFACT}); it was made by an "
                             "older automl-ad: run the search again")
        split = SearchSplit.from_json(data)
        if check:
            check_split_data(search, split, say)
        return split

    # --- trials -----------------------------------------------------------------------------------------------
    def trials(self, search_id: str) -> list[TrialRecord]:
        """Every trial of the search, best validation quality first (failed ones last)."""
        records = [self._record(run) for run in self.tracker.trials(search_id)]
        return sorted(records, key=lambda t: (not t.ok, -(t.quality or 0.0)))

    def front(self, search_id: str) -> list[TrialRecord]:
        """The complete trials on the search's Pareto front."""
        return [t for t in self.trials(search_id) if t.complete and t.on_front]

    def trial(self, run_id: str) -> TrialRecord:
        return self._record(self._run(run_id, "trial"))

    @staticmethod
    def _record(run) -> TrialRecord:
        tags = run.data.tags
        rank = tags.get("pareto_rank")
        return TrialRecord(
            run_id=run.info.run_id, search_id=tags.get("automl_ad.search", ""), trial=tags.get("trial", ""),
            family=tags.get("family", ""), route=tags.get("route", ""), status=tags.get("status", ""),
            default_config=tags.get("default_config") == "True",
            pareto_rank=int(rank) if rank not in (None, "") else None,
            params={k: _value(v) for k, v in run.data.params.items() if k != "family"},
            metrics=dict(run.data.metrics), failure_reason=tags.get("failure_reason"), error=tags.get("error"),
            node=tags.get("node_id"))

    def model_dir(self, trial: TrialRecord, tmp: Path, work_dir: str | None = None) -> Path:
        """The trial's saved model: logged in the store (front members), else still in the search's working
        folder; a UsageError when it was not kept."""
        client = self.tracker.client
        if any(a.path == "model" for a in client.list_artifacts(trial.run_id)):
            return Path(client.download_artifacts(trial.run_id, "model", str(tmp)))
        local = Path(work_dir) / "trials" / trial.trial / "model" if work_dir else None
        if local is not None and local.is_dir():
            return local
        raise UsageError(f"the model of run {trial.run_id} was not kept (only Pareto-front models are logged; "
                         "dominated ones are evicted to respect the disk cap). Export a front member: "
                         "automl-ad leaderboard --pareto")

    def artifact_file(self, run_id: str, path: str, destination: str | Path) -> Path:
        """Download one artifact of a run into ``destination``; returns its local path."""
        return Path(self.tracker.client.download_artifacts(run_id, path, str(destination)))

    def artifact_json(self, run_id: str, path: str) -> dict | None:
        """A JSON artifact of a run, or None when it was not logged."""
        client = self.tracker.client
        if path not in {a.path for a in client.list_artifacts(run_id, str(Path(path).parent))}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


# --- the data a search used -------------------------------------------------------------------------------------
def check_split_data(search: SearchRecord, split: SearchSplit, say=None) -> None:
    """Raise :class:`~automl_ad.errors.DataChangedError` (exit code 3) unless the files of ``split`` are still
    those search ``search`` used: an image or mask is gone (the dataset moved or deleted, the search's folder
    cleaned), or an image's content differs from the sha256 the search recorded for it. Held-out images the split
    holds no hash for (those beside synthetic anomalies) are checked against the hashes in the search's
    synthetic-validation manifest, and any left over together against the dataset fingerprint the search
    recorded. Each image is read once and its hash kept in ``split`` (``content_hashes``), so the feature cache
    does not hash it again. ``say`` (if given) hears of images added to the dataset after the search: the split
    does not hold them, so nothing uses them."""
    sets = [s for s in (split.train, split.validation, split.test, split.reference, split.synthetic_reference)
            if s is not None and s.paths is not None and len(s)]
    recorded: dict[Path, str | None] = {}
    for images in sets:
        for path, digest in zip(images.paths, images.content_hashes or [None] * len(images)):
            if recorded.get(Path(path)) is None:
                recorded[Path(path)] = digest
    masks = list(dict.fromkeys(Path(m) for images in sets for m in images.mask_paths or [] if m is not None))
    root = Path(search.data) if search.data else None
    missing = [p for p in [*recorded, *masks] if not p.is_file()]
    if missing:
        raise _missing_error(search, root, missing, len(recorded) + len(masks))
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        current = dict(zip(recorded, pool.map(_file_sha256, recorded)))
    known = {**_synthetic_sources(search), **{p: d for p, d in recorded.items() if d}}
    changed = [p for p in recorded if p in known and known[p] != current[p]]
    if changed:
        raise _changed_error(search, root, changed, len(recorded))
    in_dataset = [p for p in recorded if root is not None and p.is_relative_to(root)]
    unchecked = [p for p in in_dataset if p not in known]
    scanned = _scan(root) if root is not None and (unchecked or say is not None) else None
    if unchecked and search.fingerprint and _fingerprint(scanned, in_dataset, current) != search.fingerprint:
        raise _changed_error(search, root, unchecked, len(recorded), one_by_one=False)
    for images in sets:
        if not images.content_hashes:
            images.content_hashes = [current[Path(p)] for p in images.paths]
    if say is not None and scanned is not None:
        _say_added(search, root, scanned, set(recorded), say)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _named(paths: list[Path], root: Path | None) -> str:
    """Up to :data:`NAMED_FILES` of ``paths`` (relative to ``root`` where under it), and how many more."""
    names = [p.relative_to(root).as_posix() if root is not None and p.is_relative_to(root) else str(p)
             for p in paths[:NAMED_FILES]]
    more = f" and {len(paths) - NAMED_FILES} more" if len(paths) > NAMED_FILES else ""
    return ", ".join(names) + more


#: Why the files must be as they were, in every error of :func:`check_split_data`.
_NEEDED = ("Its models were trained and ranked on those files as they were, and their thresholds are calibrated "
           "and their figures measured on the same files")


def _search_again(root: Path | None) -> str:
    return f"search the dataset as it is now (`automl-ad search {root or 'DATA'}`) and use that search"


def _missing_error(search: SearchRecord, root: Path | None, missing: list[Path], total: int) -> DataChangedError:
    """The error for files of the split that are gone: the whole dataset, some of its files, or the synthetic
    validation images in the search's working folder."""
    made = [p for p in missing if search.work_dir and p.is_relative_to(search.work_dir)]
    ours = [p for p in missing if p not in made]
    if root is not None and not root.is_dir():
        message = (f"the dataset search {search.run_id} used, {root}, is gone (moved or deleted?): {missing[0]} "
                   f"is not there. {_NEEDED}. Put the dataset back at {root}, or search it where it is now "
                   "(`automl-ad search NEW_FOLDER`) and use that search")
    elif ours:
        message = (f"{len(ours)} of the {total} files (images and masks) search {search.run_id} used are gone"
                   f"{f' from its dataset {root}' if root is not None else ''}: {_named(ours, root)}. {_NEEDED}. "
                   f"Restore them, or {_search_again(root)}")
    else:
        message = (f"{len(made)} of the synthetic validation images search {search.run_id} made are gone from its "
                   f"working folder {search.work_dir} (e.g. {made[0]}): the folder was moved, cleaned or deleted. "
                   f"{_NEEDED}. Restore that folder, or {_search_again(root)}")
    return DataChangedError(message, [str(p) for p in missing])


def _changed_error(search: SearchRecord, root: Path | None, changed: list[Path], total: int,
                   one_by_one: bool = True) -> DataChangedError:
    """The error for images of the split whose content is not what the search read."""
    if one_by_one:
        what = f"{len(changed)} of the {total} images it used differ from what it read: {_named(changed, root)}"
    else:
        what = (f"the {len(changed)} held-out images it recorded no hash for one by one no longer match the "
                f"dataset fingerprint it recorded ({search.fingerprint}), so one or more of these changed: "
                f"{_named(changed, root)}")
    return DataChangedError(
        f"the dataset search {search.run_id} used ({root or 'unknown'}) has changed since the search: {what}. "
        f"{_NEEDED}: thresholds set on changed images would not fit its models, and a package would name a "
        f"dataset it was not calibrated on. Restore the files the search used, or {_search_again(root)}",
        [str(p) for p in changed])


def _synthetic_sources(search: SearchRecord) -> dict[Path, str]:
    """The sha256 of each held-out normal image the search's synthetic validation anomalies were made from, as
    the synthetic-validation manifest in its working folder recorded them (empty when there is none). The folder
    is named by the dataset fingerprint, so every search that wrote it read the same images."""
    if not search.work_dir:
        return {}
    try:
        key = json.loads((validation_folder(search.work_dir, search.seed) / "manifest.json").read_text())
        sources, hashes = key["sources"], key["hashes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(sources, list) or not isinstance(hashes, list) or len(sources) != len(hashes):
        return {}
    return {Path(s).resolve(): h for s, h in zip(sources, hashes) if isinstance(s, str) and isinstance(h, str)}


def _scan(root: Path):
    """The dataset's categories as the layout finds them now (None when it no longer finds a dataset there)."""
    from automl_ad.data.layout import scan

    try:
        return scan(root)
    except InvalidDatasetError:
        return None


def _fingerprint(scanned, paths: list[Path], hashes: dict[Path, str]) -> str | None:
    """The dataset fingerprint (:meth:`automl_ad.data.Dataset.fingerprint`) of the images ``paths`` with the
    content ``hashes``, labelled as the layout ``scanned`` labels them; None when it no longer holds one of them."""
    from automl_ad.data import Dataset

    if scanned is None or len(scanned) != 1:
        return None
    category = scanned[0]
    by_path = {record.path.resolve(): record for record in category.records}
    records = [by_path.get(p) for p in paths]
    if any(record is None for record in records):
        return None
    info = {record.path: SimpleNamespace(sha256=hashes[p]) for p, record in zip(paths, records)}
    return Dataset(category.name, category.root, category.layout, records, info).fingerprint()


def _say_added(search: SearchRecord, root: Path, scanned, used: set[Path], say) -> None:
    """A note naming the images of the dataset that are newer than the search (their inode changed after it
    started: added, or changed in place) and not in its split: nothing of the search uses them."""
    started = search.start_time / 1000
    added = []
    for category in scanned:
        for record in category.records:
            path = record.path.resolve()
            try:
                if path not in used and path.stat().st_ctime > started:
                    added.append(path)
            except OSError:
                continue
    if added:
        say(f"note: {len(added)} image(s) in {root} are newer than search {search.run_id} and not among the "
            f"images it used ({_named(sorted(added), root)}): its models are trained and calibrated without them. "
            f"To use them, {_search_again(root)}.")
