"""Search spaces: ``search_spaces/<family>.yaml`` read, checked against the detector, and sampled with Optuna.

A space lists constructor parameters with a type (``float``/``int`` with ``low``/``high``/``log``/``step``,
``categorical`` with ``choices``, ``backbone`` = categorical narrowed by the latency budget) and an optional
``when: {earlier_param: value | [values]}`` condition. Sampling is define-by-run, so conditional parameters are
only suggested when their condition holds. Defaults stay in the detector: an unsampled parameter keeps its default.

Categorical choices may be lists or mappings (Optuna sees them by their JSON text). The input geometry of backbone
families depends on the dataset, so it is not in the YAML files: :meth:`SearchSpace.with_geometries` adds it as a
categorical over the geometries the recommendation proposes (chosen, default, alternatives).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from automl_ad.errors import ConfigError, InvalidParameterError
from automl_ad.safe_yaml import load_yaml_file

TYPES = ("float", "int", "categorical", "backbone")
SPACES_ENV = "AUTOML_AD_SEARCH_SPACES"


@dataclass(frozen=True)
class Parameter:
    """One searchable constructor parameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict = field(default_factory=dict)

    def active(self, values: dict) -> bool:
        """Whether the condition on earlier parameters holds for ``values``."""
        for key, allowed in self.when.items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            if values.get(key) not in allowed:
                return False
        return True


@dataclass(frozen=True)
class SearchSpace:
    """The searchable parameters of one family, in sampling order."""

    family: str
    parameters: tuple[Parameter, ...]
    source: str = ""

    def narrowed(self, backbones: list[str] | None) -> SearchSpace:
        """The space with backbone choices restricted to ``backbones`` (kept in the space's order; if none of
        them is in the space, the space's first — lightest — backbone alone)."""
        if backbones is None:
            return self
        params = []
        for p in self.parameters:
            if p.type == "backbone":
                kept = tuple(b for b in p.choices if b in backbones) or p.choices[:1]
                p = Parameter(p.name, p.type, choices=kept, when=p.when)
            params.append(p)
        return SearchSpace(self.family, tuple(params), self.source)

    def for_gpu(self) -> SearchSpace:
        """The space a GPU trial can run: without ``precision: int8`` (ONNX Runtime on CPU only; fit refuses it)."""
        params = tuple(p if p.name != "precision" else
                       Parameter(p.name, p.type, choices=tuple(c for c in p.choices if c != "int8") or ("fp32",),
                                 when=p.when) for p in self.parameters)
        return SearchSpace(self.family, params, self.source)

    def with_geometries(self, geometries: list[dict] | None) -> SearchSpace:
        """The space with a ``geometry`` categorical over ``geometries`` (dicts as ``Geometry.to_dict``, in the
        given order, duplicates dropped) sampled first, replacing any ``geometry`` the space had. Only geometries
        the family accepts with its defaults are kept (families whose own network reads ``input_size`` squares take
        only that square; they keep searching ``input_size`` when their space does). Unchanged when none is left or
        the family takes no geometry (it reads no backbone)."""
        from automl_ad.detectors import detector_class

        family = detector_class(self.family)
        if "geometry" not in family._get_param_names() or (
                family.square_network_input and any(p.name == "input_size" for p in self.parameters)):
            return self
        choices: list[dict] = []
        for geometry in geometries or []:
            try:
                family(geometry=dict(geometry))._validate_params()
            except InvalidParameterError:
                continue
            if geometry not in choices:
                choices.append(dict(geometry))
        if not choices:
            return self
        rest = tuple(p for p in self.parameters if p.name != "geometry")
        return SearchSpace(self.family, (Parameter("geometry", "categorical", choices=tuple(choices)), *rest),
                           self.source)

    def sample(self, trial, prefix: str = "") -> dict:
        """Suggest a configuration on an Optuna trial (define-by-run); names are ``prefix + parameter``."""
        values: dict = {}
        for p in self.parameters:
            if not p.active(values):
                continue
            name = prefix + p.name
            if p.type == "float":
                values[p.name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                values[p.name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            else:
                labels = [_label(c) for c in p.choices]
                values[p.name] = p.choices[labels.index(trial.suggest_categorical(name, labels))]
        return values


def proposed_geometries(recommendation: dict) -> list[dict]:
    """The geometries a recommendation proposes (``recommendation["geometry"]``): the chosen one, the default (the
    same when the recommendation kept it: the search reads that from the first two), then the alternatives not
    listed yet; none when it proposes none."""
    proposal = recommendation.get("geometry") or {}
    if not proposal:
        return []
    chosen, default = proposal["geometry"], proposal["default"]["geometry"]
    alternatives = [a["geometry"] for a in proposal["alternatives"]]
    return [chosen, default, *(g for i, g in enumerate(alternatives) if g not in [chosen, default, *alternatives[:i]])]


def _label(choice):
    """Optuna categoricals must be None/bool/int/float/str: lists become their JSON text."""
    return json.dumps(choice, sort_keys=True) if isinstance(choice, (list, tuple, dict)) else choice


def spaces_dir() -> Path:
    """The search spaces shipped with automl-ad (the repository's ``search_spaces/``, installed as package data
    ``automl_ad.search_spaces``); ``$AUTOML_AD_SEARCH_SPACES`` overrides."""
    if os.environ.get(SPACES_ENV):
        return Path(os.environ[SPACES_ENV])
    return Path(str(resources.files("automl_ad.search_spaces")))


def searchable_families() -> list[str]:
    """Registered families that have a search space (what a recommendation may shortlist)."""
    from automl_ad.detectors import list_detectors

    directory = spaces_dir()
    return [f for f in list_detectors() if (directory / f"{f}.yaml").is_file()]


def load_space(family: str, directory: str | Path | None = None) -> SearchSpace:
    """Read and check ``<directory>/<family>.yaml`` against the family's constructor."""
    from automl_ad.detectors import detector_class

    path = Path(directory or spaces_dir()) / f"{family}.yaml"
    if not path.is_file():
        raise ConfigError(f"no search space for family '{family}': {path} is missing. Write one (see "
                          "search_spaces/patchcore.yaml for the format) or leave the family out with --families")
    raw = load_yaml_file(path) or {}
    if raw.get("family", family) != family:
        raise ConfigError(f"{path}: says family '{raw['family']}' but is named for '{family}'")
    accepted = detector_class(family)._get_param_names()
    params, seen = [], set()
    for name, spec in (raw.get("parameters") or {}).items():
        where = f"{path}: parameter '{name}'"
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where} is not a parameter of {family}{hint}. Accepted: {', '.join(accepted)}")
        params.append(_parameter(name, spec or {}, where, seen))
        seen.add(name)
    if not params:
        raise ConfigError(f"{path}: lists no parameters")
    return SearchSpace(family, tuple(params), str(path))


def _parameter(name: str, spec: dict, where: str, earlier: set) -> Parameter:
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    when = spec.get("when") or {}
    missing = [k for k in when if k not in earlier]
    if missing:
        raise ConfigError(f"{where}: condition on {missing}, which must be listed before it")
    if kind in ("float", "int"):
        low, high = spec.get("low"), spec.get("high")
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low >= high:
            raise ConfigError(f"{where}: needs numeric low < high, got low={low!r} high={high!r}")
        if spec.get("log") and (low <= 0 or spec.get("step")):
            raise ConfigError(f"{where}: a log range needs low > 0 and no step")
        return Parameter(name, kind, float(low), float(high), bool(spec.get("log", False)), spec.get("step"), when=when)
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: needs a non-empty list of choices")
    return Parameter(name, kind, choices=tuple(tuple(c) if isinstance(c, list) else c for c in choices), when=when)


def allowed_backbones(route: str, constraints, resolution: int = 256) -> list[str] | None:
    """Backbones whose estimated latency on this route fits the constraint profile's budget (None: no budget,
    every backbone is allowed). From the recommender's cost model."""
    from automl_ad.recommend.cost import backbone_ms, cost_model

    budget = constraints.effective_latency_ms
    spec = cost_model()["routes"].get(route, {})
    if budget is None or not spec.get("backbone"):
        return None
    return [b["name"] for b in cost_model()["backbones"]
            if backbone_ms(b["gmac_224"], resolution, constraints) * spec["head_factor"] <= budget]
