"""Read the knowledge files and validate them strictly into ``KnowledgeBase`` records."""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import fields
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from .records import (
    APPLICABILITY,
    BRANCHES,
    COMPLEXITY_LEVELS,
    COMPUTE_CLASSES,
    FPS_PATTERN,
    LEADERBOARD_COLUMNS,
    LEADERBOARD_FILE,
    ROUTE_KEYS,
    SAMPLE_LEVELS,
    SCORE_DIMENSIONS,
    SPEED_CLASSES,
    SUB_BRANCHES,
    Document,
    Evidence,
    KnowledgeBase,
    KnowledgeError,
    Method,
    Precondition,
    Requirements,
    Route,
    SampleGuidance,
    Scenario,
    Score,
    ScoreDimension,
)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SOURCES_FILE = "sources.yaml"
ROUTES_FILE = "routes.yaml"
METHODS_FILE = "methods.yaml"
SCENARIOS_FILE = "scenarios.yaml"

_REQUIREMENT_FIELDS = tuple(f.name for f in fields(Requirements))
_REQUIREMENT_CHOICES = {"speed_class": SPEED_CLASSES, "compute": COMPUTE_CLASSES}
_FACT_KEYS = ({"value", "basis", "source"}, {"derived"})
_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


@functools.cache
def load_knowledge(data_dir: str | os.PathLike[str] | None = None) -> KnowledgeBase:
    """Load the packaged knowledge (or the files in ``data_dir``), validated; cached per argument.

    Raises ``KnowledgeError`` (a ``ValueError``) naming the file and key of any problem.
    """
    root = files(__package__) if data_dir is None else Path(data_dir)
    documents, sources = _load_sources(root)
    dimensions, routes = _load_routes(root, sources)
    methods = _load_methods(root, sources, routes)
    scenarios, guidance, preconditions = _load_scenarios(root, sources)
    _check_leaderboard(root, methods)
    return KnowledgeBase(
        routes=routes,
        methods=methods,
        scenarios=scenarios,
        sample_guidance=guidance,
        preconditions=preconditions,
        score_dimensions=dimensions,
        documents=documents,
        data_dir=root,
    )


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A safe YAML loader (libyaml-backed when available) that rejects duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _File:
    """Typed accessors over one parsed file; every failure names the file and the key path."""

    def __init__(self, root: Traversable, name: str, sources: _File | None = None):
        self.name = name
        self.refs: dict[str, str] = sources.refs if sources else {}
        self.documents: set[str] = sources.documents if sources else set()
        try:
            text = (root / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KnowledgeError(f"{name}: file not found in {root}") from None
        try:
            self.data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise KnowledgeError(f"{name}: invalid YAML: {exc}") from exc

    def fail(self, where: str, message: str) -> NoReturn:
        raise KnowledgeError(f"{self.name}: {where}: {message}")

    def mapping(self, value: Any, where: str, required: Iterable[str] = (), optional: Iterable[str] = ()) -> dict:
        """A mapping; with ``required`` given, exactly those keys plus any of ``optional``."""
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        required = set(required)
        if required:
            if missing := required - value.keys():
                self.fail(where, f"missing key(s) {sorted(missing)}")
            if unknown := value.keys() - required - set(optional):
                self.fail(where, f"unknown key(s) {sorted(map(str, unknown))}")
        return value

    def keys_exactly(self, value: dict, where: str, expected: tuple[str, ...]) -> None:
        """The mapping's keys are ``expected``, in that order."""
        if missing := [k for k in expected if k not in value]:
            self.fail(where, f"missing key(s) {missing}")
        if unknown := [k for k in value if k not in expected]:
            self.fail(where, f"unknown key(s) {unknown}")
        if tuple(value) != expected:
            self.fail(where, f"keys must be in the order {list(expected)}")

    def sequence(self, value: Any, where: str) -> list:
        if not isinstance(value, list) or not value:
            self.fail(where, "expected a non-empty list")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, "expected non-empty text")
        return value.strip()

    def optional_text(self, value: Any, where: str) -> str | None:
        return None if value is None else self.text(value, where)

    def texts(self, value: Any, where: str) -> tuple[str, ...]:
        items = tuple(self.text(v, f"{where}[{i}]") for i, v in enumerate(self.sequence(value, where)))
        if len(set(items)) != len(items):
            self.fail(where, "duplicate entries")
        return items

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected true/false, got {value!r}")
        return value

    def number(self, value: Any, where: str, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.fail(where, f"expected a number in {low:g}..{high:g}, got {value!r}")
        return float(value)

    def optional_number(self, value: Any, where: str, low: float, high: float) -> float | None:
        return None if value is None else self.number(value, where, low, high)

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(where, f"expected an integer in {low}..{high}, got {value!r}")
        return value

    def choice(self, value: Any, where: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            self.fail(where, f"expected one of {list(allowed)}, got {value!r}")
        return value

    def source(self, value: Any, where: str) -> str:
        """A citation: a ref id, an inline {doc, section, line} mapping, or a non-empty list of those."""
        if isinstance(value, list):
            return "; ".join(self.source(v, f"{where}[{i}]") for i, v in enumerate(self.sequence(value, where)))
        if isinstance(value, str):
            if value not in self.refs:
                self.fail(where, f"unknown source ref {value!r} (define it in {SOURCES_FILE} refs)")
            return self.refs[value]
        return self.citation(value, where)

    def citation(self, value: Any, where: str) -> str:
        """An inline citation ``{doc, section[, line]}`` rendered as ``doc §section, line N``."""
        raw = self.mapping(value, where, required=("doc", "section"), optional=("line",))
        doc = self.choice(raw["doc"], f"{where}.doc", tuple(sorted(self.documents)))
        text = f"{doc} §{self.text(raw['section'], f'{where}.section')}"
        if "line" in raw:
            text += f", line {self.integer(raw['line'], f'{where}.line', 1, 10**6)}"
        return text

    def fact(self, value: Any, where: str, check: Callable[[Any, str], Any]) -> tuple[Any, Evidence]:
        """A ``{value, basis, source[, derived]}`` fact: the checked value and its evidence."""
        raw = self.mapping(value, where, *_FACT_KEYS)
        evidence = Evidence(
            basis=self.text(raw["basis"], f"{where}.basis"),
            source=self.source(raw["source"], f"{where}.source"),
            derived=self.boolean(raw.get("derived", False), f"{where}.derived"),
        )
        return check(raw["value"], f"{where}.value"), evidence


def _load_sources(root: Traversable) -> tuple[MappingProxyType, _File]:
    """The documents, and the parsed sources file whose ``refs`` other files cite."""
    f = _File(root, SOURCES_FILE)
    top = f.mapping(f.data, "top level", required=("documents", "refs"))
    documents = {}
    for key, raw in f.mapping(top["documents"], "documents").items():
        where = f"documents.{key}"
        entry = f.mapping(raw, where, required=("title", "path"))
        documents[key] = Document(key, f.text(entry["title"], f"{where}.title"), f.text(entry["path"], f"{where}.path"))
    f.documents = set(documents)
    for key, raw in f.mapping(top["refs"], "refs").items():
        f.refs[f.text(key, "refs")] = f.citation(raw, f"refs.{key}")
    return MappingProxyType(documents), f


def _load_routes(root: Traversable, sources: _File) -> tuple[MappingProxyType, MappingProxyType]:
    f = _File(root, ROUTES_FILE, sources)
    top = f.mapping(f.data, "top level", required=("score_dimensions", "routes"))

    raw_dims = f.mapping(top["score_dimensions"], "score_dimensions")
    f.keys_exactly(raw_dims, "score_dimensions", SCORE_DIMENSIONS)
    dimensions = {}
    for key, raw in raw_dims.items():
        where = f"score_dimensions.{key}"
        entry = f.mapping(raw, where, required=("name", "meaning", "source"))
        dimensions[key] = ScoreDimension(
            key=key,
            name=f.text(entry["name"], f"{where}.name"),
            meaning=f.text(entry["meaning"], f"{where}.meaning"),
            source=f.source(entry["source"], f"{where}.source"),
        )

    raw_routes = f.mapping(top["routes"], "routes")
    f.keys_exactly(raw_routes, "routes", ROUTE_KEYS)
    routes = {key: _route(f, key, raw) for key, raw in raw_routes.items()}
    families: dict[str, str] = {}
    for route in routes.values():
        for family in route.families:
            if family in families:
                f.fail(f"routes.{route.key}.families", f"family {family!r} already belongs to {families[family]!r}")
            families[family] = route.key
    return MappingProxyType(dimensions), MappingProxyType(routes)


def _route(f: _File, key: str, value: Any) -> Route:
    where = f"routes.{key}"
    raw = f.mapping(
        value,
        where,
        required=(
            "name", "branch", "sub_branch", "source", "idea", "strengths", "weaknesses", "suited_when",
            "localization", "needs_training", "families", "scores", "requirements",
        ),
    )
    branch = f.choice(raw["branch"], f"{where}.branch", BRANCHES)
    if branch == "traditional":
        if raw["sub_branch"] is not None:
            f.fail(f"{where}.sub_branch", "traditional routes have sub_branch null")
        sub_branch = None
    else:
        sub_branch = f.choice(raw["sub_branch"], f"{where}.sub_branch", SUB_BRANCHES)

    basis = {}
    localization, basis["localization"] = f.fact(raw["localization"], f"{where}.localization", f.boolean)
    needs_training, basis["needs_training"] = f.fact(raw["needs_training"], f"{where}.needs_training", f.boolean)

    raw_scores = f.mapping(raw["scores"], f"{where}.scores", required=SCORE_DIMENSIONS)
    scores = {}
    for dim in SCORE_DIMENSIONS:
        value, evidence = f.fact(raw_scores[dim], f"{where}.scores.{dim}", lambda v, w: f.number(v, w, 0, 10))
        scores[dim] = Score(value=value, source=evidence.source, derived=evidence.derived, basis=evidence.basis)

    raw_reqs = f.mapping(raw["requirements"], f"{where}.requirements", required=_REQUIREMENT_FIELDS)
    requirements = {}
    for name in _REQUIREMENT_FIELDS:
        requirements[name], basis[name] = f.fact(
            raw_reqs[name], f"{where}.requirements.{name}", functools.partial(_requirement_value, f, name)
        )

    return Route(
        key=key,
        name=f.text(raw["name"], f"{where}.name"),
        branch=branch,
        sub_branch=sub_branch,
        idea=f.text(raw["idea"], f"{where}.idea"),
        strengths=f.texts(raw["strengths"], f"{where}.strengths"),
        weaknesses=f.texts(raw["weaknesses"], f"{where}.weaknesses"),
        suited_when=f.text(raw["suited_when"], f"{where}.suited_when"),
        localization=localization,
        needs_training=needs_training,
        families=f.texts(raw["families"], f"{where}.families"),
        scores=MappingProxyType(scores),
        requirements=Requirements(**requirements),
        requirement_basis=MappingProxyType(basis),
        source=f.source(raw["source"], f"{where}.source"),
    )


def _requirement_value(f: _File, name: str, value: Any, where: str) -> Any:
    if name in _REQUIREMENT_CHOICES:
        return f.choice(value, where, _REQUIREMENT_CHOICES[name])
    if name == "min_normal_images":
        return f.integer(value, where, 0, 100_000)
    return f.boolean(value, where)


def _load_methods(root: Traversable, sources: _File, routes: MappingProxyType) -> tuple[Method, ...]:
    f = _File(root, METHODS_FILE, sources)
    top = f.mapping(f.data, "top level", required=("methods",))
    methods = []
    for i, value in enumerate(f.sequence(top["methods"], "methods")):
        where = f"methods[{i}]"
        raw = f.mapping(
            value,
            where,
            required=("name", "route", "year", *_METRICS, "fps", "mechanism", "source"),
            optional=("leaderboard_model", "route_best", "notes"),
        )
        name = f.text(raw["name"], f"{where}.name")
        where = f"methods[{i}] ({name})"
        route = raw["route"]
        if not isinstance(route, str) or route not in routes:
            f.fail(f"{where}.route", f"unknown route {route!r}")
        metrics = {m: f.optional_number(raw[m], f"{where}.{m}", 0, 100) for m in _METRICS}
        methods.append(
            Method(
                name=name,
                route=route,
                year=None if raw["year"] is None else f.integer(raw["year"], f"{where}.year", 1990, 2100),
                **metrics,
                fps=f.optional_number(raw["fps"], f"{where}.fps", 0.001, 100_000),
                mechanism=f.text(raw["mechanism"], f"{where}.mechanism"),
                source=f.source(raw["source"], f"{where}.source"),
                leaderboard_model=f.optional_text(raw.get("leaderboard_model"), f"{where}.leaderboard_model"),
                route_best=f.boolean(raw.get("route_best", False), f"{where}.route_best"),
                notes=f.optional_text(raw.get("notes"), f"{where}.notes"),
            )
        )
    names = [m.name for m in methods]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        f.fail("methods", f"duplicate method name(s) {duplicates}")
    best = [m.route for m in methods if m.route_best]
    if duplicates := sorted({r for r in best if best.count(r) > 1}):
        f.fail("methods", f"more than one route_best method for route(s) {duplicates}")
    return tuple(methods)


def _load_scenarios(root: Traversable, sources: _File) -> tuple[tuple, MappingProxyType, tuple]:
    f = _File(root, SCENARIOS_FILE, sources)
    top = f.mapping(f.data, "top level", required=("scenarios", "sample_guidance", "preconditions"))

    scenarios = []
    for i, value in enumerate(f.sequence(top["scenarios"], "scenarios")):
        where = f"scenarios[{i}]"
        raw = f.mapping(
            value, where, required=("complexity", "normals", "abnormals", "anomaly_detection", "supervised", "source")
        )
        scenarios.append(
            Scenario(
                complexity=f.choice(raw["complexity"], f"{where}.complexity", COMPLEXITY_LEVELS),
                normals=f.choice(raw["normals"], f"{where}.normals", SAMPLE_LEVELS),
                abnormals=f.choice(raw["abnormals"], f"{where}.abnormals", SAMPLE_LEVELS),
                anomaly_detection=f.choice(raw["anomaly_detection"], f"{where}.anomaly_detection", APPLICABILITY),
                supervised=f.choice(raw["supervised"], f"{where}.supervised", APPLICABILITY),
                source=f.source(raw["source"], f"{where}.source"),
            )
        )
    combos = [(s.complexity, s.normals, s.abnormals) for s in scenarios]
    expected = {(c, n, a) for c in COMPLEXITY_LEVELS for n in SAMPLE_LEVELS for a in SAMPLE_LEVELS}
    if len(set(combos)) != len(combos) or set(combos) != expected:
        f.fail("scenarios", "must list each (complexity, normals, abnormals) combination exactly once")

    raw_guidance = f.mapping(top["sample_guidance"], "sample_guidance")
    f.keys_exactly(raw_guidance, "sample_guidance", SAMPLE_LEVELS)
    guidance = {}
    for level, value in raw_guidance.items():
        where = f"sample_guidance.{level}"
        raw = f.mapping(value, where, required=("routes", "text", "source"))
        if raw["routes"] == "all":
            route_keys = ROUTE_KEYS
        else:
            route_keys = f.texts(raw["routes"], f"{where}.routes")
            for key in route_keys:
                f.choice(key, f"{where}.routes", ROUTE_KEYS)
        guidance[level] = SampleGuidance(
            normals=level,
            routes=route_keys,
            text=f.text(raw["text"], f"{where}.text"),
            source=f.source(raw["source"], f"{where}.source"),
        )

    preconditions = []
    for i, value in enumerate(f.sequence(top["preconditions"], "preconditions")):
        where = f"preconditions[{i}]"
        raw = f.mapping(value, where, required=("key", "name", "description", "source"))
        preconditions.append(
            Precondition(
                key=f.text(raw["key"], f"{where}.key"),
                name=f.text(raw["name"], f"{where}.name"),
                description=f.text(raw["description"], f"{where}.description"),
                source=f.source(raw["source"], f"{where}.source"),
            )
        )
    keys = [p.key for p in preconditions]
    if len(set(keys)) != len(keys):
        f.fail("preconditions", "duplicate key")
    return tuple(scenarios), MappingProxyType(guidance), tuple(preconditions)


def _check_leaderboard(root: Traversable, methods: tuple[Method, ...]) -> None:
    """The leaderboard CSV is well formed and names every method's ``leaderboard_model``."""
    try:
        text = (root / LEADERBOARD_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KnowledgeError(f"{LEADERBOARD_FILE}: file not found in {root}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or tuple(rows[0]) != LEADERBOARD_COLUMNS:
        raise KnowledgeError(f"{LEADERBOARD_FILE}: header must be {','.join(LEADERBOARD_COLUMNS)}")
    models = set()
    for line, row in enumerate(rows[1:], start=2):
        problem = _leaderboard_row_problem(row, rank=line - 1)
        if problem:
            raise KnowledgeError(f"{LEADERBOARD_FILE}: line {line}: {problem}")
        models.add(row[1])
    for method in methods:
        if method.leaderboard_model is not None and method.leaderboard_model not in models:
            raise KnowledgeError(
                f"{METHODS_FILE}: {method.name}: leaderboard_model {method.leaderboard_model!r} "
                f"is not a model in {LEADERBOARD_FILE}"
            )


def _leaderboard_row_problem(row: list[str], rank: int) -> str | None:
    if len(row) != len(LEADERBOARD_COLUMNS):
        return f"expected {len(LEADERBOARD_COLUMNS)} fields, got {len(row)}"
    rank_text, model, *metrics, fps, year = row
    if rank_text != str(rank):
        return f"rank {rank_text!r}, expected {rank}"
    if not model.strip():
        return "empty model name"
    for column, value in zip(LEADERBOARD_COLUMNS[2:6], metrics):
        if value and (not re.fullmatch(r"\d+(\.\d+)?", value) or float(value) > 100):
            return f"{column} {value!r} is not a percentage"
    if fps and not re.match(FPS_PATTERN, fps):
        return f"fps {fps!r} is not a number with an optional note"
    if year and not re.fullmatch(r"\d{4}", year):
        return f"year {year!r} is not a year"
    return None
