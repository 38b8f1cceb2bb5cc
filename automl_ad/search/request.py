"""What a search is asked to do (:class:`SearchRequest`, filled by the CLI), what it returns, and the checks
of the limits it is given."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from automl_ad.defaults import (
    DEFAULT_FALSE_ALARM_RATE,
    SEARCH_ARTIFACT_CAP_MB,
    SEARCH_CACHE_CAP_MB,
    SEARCH_MAX_BUDGET_S,
)
from automl_ad.errors import UsageError


@dataclass
class SearchRequest:
    """Everything a search needs; the CLI fills it from arguments, the recommend state and the profile."""

    data: str
    category: str | None = None
    families: list[str] = field(default_factory=list)
    priors: dict[str, float] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    budget_s: float | None = 3600.0  # None when resuming: the search keeps its own budget
    max_trials: int | None = None
    seed: int = 0
    metric: str = "combined"
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE  # the operating point of --metric detection_at_far
    validation: str = "auto"
    compare_synthetic: bool = False  # ranking on real defects: score synthetic anomalies too (selection agreement)
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    trial_timeout_s: float | None = None
    backbones: dict[str, list[str]] = field(default_factory=dict)  # per family: allowed backbones (absent = any)
    backbone_weights: dict[str, str] = field(default_factory=dict)
    preferred_backbone: str | None = None
    geometries: list[dict] = field(default_factory=list)  # recommended input geometries (chosen first)
    device: str = "auto"
    cache_cap_mb: float = SEARCH_CACHE_CAP_MB
    artifact_cap_mb: float = SEARCH_ARTIFACT_CAP_MB
    profile_file: str | None = None
    recommendation_file: str | None = None
    screen_file: str | None = None  # recommend's screen of the good images, logged with the search
    limits: dict = field(default_factory=dict)  # the constraint profile's deployment limits (export honours them)


@dataclass
class SearchResult:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    trials: list[dict]
    front: list[dict]
    work_dir: str


def check_search_limits(budget_s, max_trials, trial_timeout_s, resume: bool = False) -> None:
    """Refuse a budget, trial time limit or trial count a search cannot honour, saying what to give instead.
    ``budget_s`` may be None when resuming (the search keeps its own budget)."""
    longest = f"{SEARCH_MAX_BUDGET_S / 86400:g} days ({SEARCH_MAX_BUDGET_S:.0f} s)"
    for option, value in (("--budget", budget_s), ("--trial-timeout", trial_timeout_s)):
        if value is None and (option == "--trial-timeout" or resume):
            continue
        if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                or not 0 < value <= SEARCH_MAX_BUDGET_S):
            raise UsageError(f"{option} must be a positive, finite duration of at most {longest}; got {value!r} s. "
                             "Give e.g. --budget 8h or --trial-timeout 900")
    if max_trials is not None and (not isinstance(max_trials, numbers.Integral) or isinstance(max_trials, bool)
                                   or max_trials < 1):
        raise UsageError(f"--max-trials must be at least 1, got {max_trials!r}; leave it out to let the budget alone "
                         "end the search")
