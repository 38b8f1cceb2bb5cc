"""DatasetProfile: the facts about a dataset that the recommender and the search use (saved as JSON)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from automl_ad import __version__
from automl_ad.data.dataset import Dataset
from automl_ad.data.io import load_image
from automl_ad.defaults import IO_WORKERS, PROFILE_RESOLUTION, PROFILE_SAMPLE_IMAGES
from automl_ad.errors import ConfigError
from automl_ad.profiling.structure import AlignmentStats, StructureStats, alignment_stats, structure_stats

SCHEMA_VERSION = 1

#: Facts a constraint profile may override, with their types.
OVERRIDABLE_FACTS = {"kind": str, "periodic": bool, "aligned": bool, "color": str, "n_normal": int}


_ALLOWED_VALUES = {"kind": ("texture", "object"), "color": ("gray", "color", "mixed")}


def validate_overrides(overrides: dict, where: str = "data overrides") -> None:
    """Raise :class:`ConfigError` unless every override names a known fact with a value of the right type."""
    for key, value in overrides.items():
        if key not in OVERRIDABLE_FACTS:
            raise ConfigError(f"{where}: '{key}' is not a known fact; use one of {sorted(OVERRIDABLE_FACTS)}")
        if type(value) is not OVERRIDABLE_FACTS[key]:
            raise ConfigError(f"{where}: '{key}' must be {OVERRIDABLE_FACTS[key].__name__}, got {value!r}")
        if key in _ALLOWED_VALUES and value not in _ALLOWED_VALUES[key]:
            raise ConfigError(f"{where}: {key}={value!r}; use one of {_ALLOWED_VALUES[key]}")


@dataclass(frozen=True)
class Counts:
    normal_train: int
    normal_test: int
    normal_unsplit: int  # plain/flat layouts do not declare train/test
    abnormal: dict[str, int]
    masks: int
    skipped_files: int

    @property
    def normal_for_training(self) -> int:
        return self.normal_train + self.normal_unsplit

    @property
    def abnormal_total(self) -> int:
        return sum(self.abnormal.values())


@dataclass(frozen=True)
class SizeStats:
    width_min: int
    width_median: float
    width_max: int
    height_min: int
    height_median: float
    height_max: int
    distinct_sizes: int


@dataclass(frozen=True)
class ColorStats:
    mode: str  # "gray", "color" or "mixed"
    gray_files: int
    color_files: int
    effectively_gray_color_files: int  # RGB files whose channels are identical
    bit_depths: list[int]


@dataclass(frozen=True)
class DefectStats:
    """Defect size from masks: area as a fraction of the image, and connected regions per image."""

    masks: int
    area_fraction_min: float
    area_fraction_median: float
    area_fraction_max: float
    small_defect_share: float  # share of masks covering less than 1% of the image
    regions_median: float


@dataclass(frozen=True)
class DatasetProfile:
    """Everything automl-ad knows about one dataset category."""

    name: str
    root: str
    layout: str
    fingerprint: str
    counts: Counts
    size: SizeStats
    color: ColorStats
    structure: StructureStats
    alignment: AlignmentStats
    defects: DefectStats | None
    sample_images: int
    sample_resolution: int
    profiling_seconds: float
    overrides: dict = field(default_factory=dict)
    automl_ad_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def facts(self) -> dict:
        """The flat facts rules are written against, after any overrides."""
        detected = {
            "kind": self.structure.kind,
            "periodic": self.structure.periodic,
            "aligned": self.alignment.template_viable,
            "per_position_aligned": self.alignment.per_position_viable,
            "color": self.color.mode,
            "n_normal": self.counts.normal_for_training,
            "n_abnormal": self.counts.abnormal_total,
            "has_masks": self.counts.masks > 0,
            "image_side": int(max(self.size.width_median, self.size.height_median)),
            "structure_confidence": self.structure.confidence,
        }
        if "aligned" in self.overrides:
            detected["per_position_aligned"] = self.overrides["aligned"]
        return {**detected, **self.overrides}

    def with_overrides(self, overrides: dict) -> DatasetProfile:
        """Return a copy whose facts are replaced by user-declared ones."""
        validate_overrides(overrides)
        return replace(self, overrides={**self.overrides, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> DatasetProfile:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"profile schema {data.get('schema_version')} is not {SCHEMA_VERSION}; profile again")
        parts = {"counts": Counts, "size": SizeStats, "color": ColorStats, "structure": StructureStats,
                 "alignment": AlignmentStats, "defects": DefectStats}
        values = dict(data)
        for key, kind in parts.items():
            if values.get(key) is not None:
                values[key] = kind(**values[key])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> DatasetProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _sample(items: list, limit: int) -> list:
    """Evenly spaced, deterministic subsample."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def profile_dataset(dataset: Dataset, sample_images: int = PROFILE_SAMPLE_IMAGES,
                    resolution: int = PROFILE_RESOLUTION) -> DatasetProfile:
    """Compute the profile. Cheap facts use every file; structure statistics use a subsample of normals."""
    start = time.perf_counter()
    infos = [dataset.info[r.path] for r in dataset.records]
    normals = dataset.normal_in("train") or dataset.normal
    sample = _sample(normals, sample_images)
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        images = np.stack(list(pool.map(lambda r: load_image(r.path, resolution, gray=True), sample)))

    widths = np.array([i.width for i in infos])
    heights = np.array([i.height for i in infos])
    gray = sum(i.channels == 1 for i in infos)
    colour = len(infos) - gray
    effectively_gray = sum(i.effectively_gray for i in infos)
    truly_colour = colour - effectively_gray
    mode = "gray" if truly_colour == 0 else "color" if truly_colour == len(infos) else "mixed"

    fractions = np.array([m.defect_fraction for m in dataset.masks.values()])
    defects = None
    if len(fractions):
        defects = DefectStats(
            masks=len(fractions), area_fraction_min=round(float(fractions.min()), 5),
            area_fraction_median=round(float(np.median(fractions)), 5),
            area_fraction_max=round(float(fractions.max()), 5),
            small_defect_share=round(float(np.mean(fractions < 0.01)), 3),
            regions_median=float(np.median([m.regions for m in dataset.masks.values()])))
    counts = Counts(normal_train=len(dataset.normal_in("train")), normal_test=len(dataset.normal_in("test")),
                    normal_unsplit=len(dataset.normal_in(None)), abnormal=dataset.defect_types,
                    masks=len(dataset.masks),
                    skipped_files=sum(p.severity == "error" and p.path is not None for p in dataset.problems))
    return DatasetProfile(
        name=dataset.name, root=str(dataset.root), layout=dataset.layout, fingerprint=dataset.fingerprint(),
        counts=counts,
        size=SizeStats(int(widths.min()), float(np.median(widths)), int(widths.max()), int(heights.min()),
                       float(np.median(heights)), int(heights.max()), len(set(zip(widths, heights)))),
        color=ColorStats(mode, int(gray), int(colour), int(effectively_gray),
                         sorted({i.bit_depth for i in infos})),
        structure=structure_stats(images), alignment=alignment_stats(images), defects=defects,
        sample_images=len(sample), sample_resolution=resolution,
        profiling_seconds=round(time.perf_counter() - start, 2))
