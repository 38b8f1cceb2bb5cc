"""Typed, immutable records for the survey report's facts (routes, methods, scenarios)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    import pandas

#: The report's seven industrial-application scores, in report order.
SCORE_DIMENSIONS = (
    "accuracy",
    "resources",
    "transferability",
    "self_update",
    "data_quality",
    "data_quantity",
    "interpretability",
)

#: The 14 technical routes in report order: six traditional, then eight deep.
ROUTE_KEYS = (
    "template_matching",
    "statistical",
    "image_decomposition",
    "frequency_domain",
    "sparse_coding",
    "classification_surface",
    "teacher_student",
    "one_class",
    "distribution_map",
    "memory_bank",
    "self_supervised",
    "autoencoder",
    "gan",
    "diffusion",
)

BRANCHES = ("traditional", "deep")
SUB_BRANCHES = ("feature_embedding", "reconstruction")
#: Inference speed classes, fastest first.
SPEED_CLASSES = ("very_fast", "fast", "medium", "slow", "very_slow")
#: Hardware classes, least demanding first.
COMPUTE_CLASSES = ("cpu_ok", "gpu_preferred", "gpu_required")
COMPLEXITY_LEVELS = ("high", "low")
SAMPLE_LEVELS = ("many", "few")
#: Scenario verdicts: usable, not usable, usable as a few-shot / small-sample variant.
APPLICABILITY = ("yes", "no", "few_shot")

LEADERBOARD_FILE = "mvtec_leaderboard_2023.csv"
LEADERBOARD_COLUMNS = ("rank", "model", "det_auroc", "seg_auroc", "seg_aupro", "seg_ap", "fps", "year")
#: A leaderboard fps cell: a number, optionally followed by a note in parentheses.
FPS_PATTERN = r"^\s*(?P<fps>\d+(?:\.\d+)?)\s*(?:\((?P<note>[^)]*)\))?\s*$"


class KnowledgeError(ValueError):
    """A knowledge file is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Document:
    """A source document that facts cite."""

    key: str
    title: str
    path: str


@dataclass(frozen=True)
class Evidence:
    """Why a fact holds: the report statement it rests on, and where that statement is."""

    basis: str
    source: str
    derived: bool = False


@dataclass(frozen=True)
class Score:
    """One industrial score (0-10, higher is better for the user)."""

    value: float
    source: str
    derived: bool
    basis: str


@dataclass(frozen=True)
class ScoreDimension:
    """Meaning of one score dimension."""

    key: str
    name: str
    meaning: str
    source: str


@dataclass(frozen=True)
class Requirements:
    """Structured preconditions of a route, for the rule engine."""

    needs_periodic_texture: bool
    needs_homogeneous_texture: bool
    needs_aligned_images: bool
    needs_simple_background: bool
    image_level_only: bool
    needs_pretrained_backbone: bool
    min_normal_images: int
    speed_class: str
    compute: str


@dataclass(frozen=True)
class Route:
    """A technical route of the report.

    ``requirement_basis`` holds the evidence for every ``requirements`` field and for
    ``localization`` and ``needs_training``.
    """

    key: str
    name: str
    branch: str
    sub_branch: str | None
    idea: str
    strengths: tuple[str, ...]
    weaknesses: tuple[str, ...]
    suited_when: str
    localization: bool
    needs_training: bool
    families: tuple[str, ...]
    scores: Mapping[str, Score]
    requirements: Requirements
    requirement_basis: Mapping[str, Evidence]
    source: str


@dataclass(frozen=True)
class Method:
    """A representative method with the report's MVTec AD figures (percent; None = not given)."""

    name: str
    route: str
    year: int | None
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    pixel_ap: float | None
    fps: float | None
    mechanism: str
    source: str
    leaderboard_model: str | None = None
    route_best: bool = False
    notes: str | None = None


@dataclass(frozen=True)
class Scenario:
    """One row of the report's single-scene applicability table."""

    complexity: str
    normals: str
    abnormals: str
    anomaly_detection: str
    supervised: str
    source: str


@dataclass(frozen=True)
class SampleGuidance:
    """Routes usable with many or few normal samples."""

    normals: str
    routes: tuple[str, ...]
    text: str
    source: str


@dataclass(frozen=True)
class Precondition:
    """An assumption a scene must meet for anomaly detection to apply."""

    key: str
    name: str
    description: str
    source: str


@dataclass(frozen=True)
class KnowledgeBase:
    """All facts of the report, validated. Obtain it with ``load_knowledge()``."""

    routes: Mapping[str, Route]
    methods: tuple[Method, ...]
    scenarios: tuple[Scenario, ...]
    sample_guidance: Mapping[str, SampleGuidance]
    preconditions: tuple[Precondition, ...]
    score_dimensions: Mapping[str, ScoreDimension]
    documents: Mapping[str, Document]
    data_dir: Traversable = field(repr=False, compare=False)

    def methods_for(self, route: str) -> list[Method]:
        """Methods of one route, in file order."""
        if route not in self.routes:
            raise KeyError(f"unknown route {route!r}; known: {', '.join(self.routes)}")
        return [m for m in self.methods if m.route == route]

    def scenario(self, *, complexity: str, normals: str, abnormals: str) -> Scenario:
        """The scenario-table row for data complexity (high|low) and normal/abnormal counts (many|few)."""
        for name, value, allowed in (
            ("complexity", complexity, COMPLEXITY_LEVELS),
            ("normals", normals, SAMPLE_LEVELS),
            ("abnormals", abnormals, SAMPLE_LEVELS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        return next(
            s
            for s in self.scenarios
            if (s.complexity, s.normals, s.abnormals) == (complexity, normals, abnormals)
        )

    def leaderboard(self) -> pandas.DataFrame:
        """The report's 82-row MVTec AD leaderboard (a fresh DataFrame per call).

        ``fps`` is numeric; the text some rows add (e.g. the GPU used) is in ``fps_note``.
        """
        import pandas as pd

        with (self.data_dir / LEADERBOARD_FILE).open("r", encoding="utf-8", newline="") as fh:
            df = pd.read_csv(fh, dtype={"model": str, "fps": str})
        parts = df["fps"].str.extract(FPS_PATTERN)
        df["fps"] = pd.to_numeric(parts["fps"])
        df.insert(len(df.columns) - 1, "fps_note", parts["note"])
        df["year"] = df["year"].astype("Int64")
        return df

