"""DatasetProfile: the facts about a dataset that the recommender and the search use (saved as JSON).

Cheap facts (counts, sizes, aspect ratios, colour, mask areas) use every file. Structure statistics use a sample of
normal images analysed at the dataset's median aspect ratio (see :func:`structure_shape`). Defect sizes come from
a sample of masks: per mask, the short side of the bounding box of its largest defect region (an image is
flagged when its main defect is seen; fragments of the same defect ride along). Empty masks (a defective image
whose mask marks nothing) count neither as masks nor towards defect sizes, and blank images (every pixel alike:
a failed capture) neither towards colour nor structure; the dataset check warns about both, naming the files.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from automl_ad.data.dataset import Dataset
from automl_ad.data.geometry import Geometry, feature_cells
from automl_ad.data.io import ImageReadError, load_image, read_mask
from automl_ad.data.validation import LABEL_SHORTCUT
from automl_ad.defaults import (
    GEOMETRY_BASE_SIDE,
    GEOMETRY_FEATURE_STRIDE,
    IO_WORKERS,
    PROFILE_MAX_ASPECT,
    PROFILE_RESOLUTION,
    PROFILE_SAMPLE_IMAGES,
    PROFILE_SAMPLE_MASKS,
    PROFILE_SAMPLE_PIXELS,
    SMALLEST_DEFECT_FRACTION,
)
from automl_ad.errors import ConfigError, UsageError
from automl_ad.profiling.structure import AlignmentStats, StructureStats, alignment_stats, structure_stats
from automl_ad.version import __version__

SCHEMA_VERSION = 2
#: A file larger than this is never taken for an earlier profile (they are a few kilobytes).
PROFILE_MAX_BYTES = 16 * 2**20

#: Facts a constraint profile may override, with their types.
OVERRIDABLE_FACTS = {"kind": str, "periodic": bool, "aligned": bool, "color": str, "n_normal": int,
                     "smallest_defect_px": int}


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
        if key == "smallest_defect_px" and value < 1:
            raise ConfigError(f"{where}: smallest_defect_px={value}; give the defect's size in image pixels (>= 1)")


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
    aspect_median: float  # width / height
    aspect_p10: float
    aspect_p90: float

    @property
    def median_hw(self) -> tuple[int, int]:
        return round(self.height_median), round(self.width_median)

    @property
    def elongation(self) -> float:
        """Long side over short side of the median image (1 = square)."""
        return max(self.aspect_median, 1 / self.aspect_median)


@dataclass(frozen=True)
class ColorStats:
    mode: str  # "gray", "color" or "mixed"
    gray_files: int  # these three leave blank images out (unless every image is blank)
    color_files: int
    effectively_gray_color_files: int  # RGB files whose channels are identical
    bit_depths: list[int]
    full_scale: int | None = None  # what 16-bit pixels are divided by (Dataset.full_scale; None: 65535)


@dataclass(frozen=True)
class DefectStats:
    """Defect size from masks: area as a fraction of the image, connected regions per image, and the size of each
    mask's largest region (short side of its bounding box) in pixels, as a fraction of the image's short side and
    in feature cells at the families' default geometry (a 256 x 256 squash, stride 8)."""

    masks: int
    area_fraction_min: float
    area_fraction_median: float
    area_fraction_max: float
    small_defect_share: float  # share of masks covering less than 1% of the image
    regions_median: float
    measured_masks: int  # masks read for the sizes below (a sample; empty masks are not counted)
    size_px_p10: float
    size_px_median: float
    size_fraction_p10: float
    size_fraction_median: float
    base_cells_p10: float
    base_cells_median: float


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
    sample_resolution: int  # short side of the structure sample
    sample_hw: tuple[int, int]  # (height, width) of the structure sample: the median aspect ratio kept
    profiling_seconds: float
    overrides: dict = field(default_factory=dict)
    #: File facts that alone tell defective images from good ones, found when the dataset was checked
    #: (:func:`~automl_ad.data.validation.label_shortcuts`), as sentences: scores measured on these images may
    #: reward the fact, not the defect.
    shortcuts: list[str] = field(default_factory=list)
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
            "aspect": round(self.size.elongation, 2),
            "smallest_defect_px": round(self.smallest_defect()[0], 1),
            "structure_confidence": self.structure.confidence,
        }
        if "aligned" in self.overrides:
            detected["per_position_aligned"] = self.overrides["aligned"]
        return {**detected, **self.overrides}

    def smallest_defect(self) -> tuple[float, str]:
        """Size in image pixels of the smallest defect worth finding, and where that figure comes from: declared
        in the constraint profile, else the 10th percentile of the measured masks, else an assumed fraction of the
        median image's short side."""
        if "smallest_defect_px" in self.overrides:
            return float(self.overrides["smallest_defect_px"]), "declared in the constraint profile"
        if self.defects is not None and self.defects.measured_masks:
            return self.defects.size_px_p10, (f"10th percentile of {self.defects.measured_masks} masks (short side "
                                               "of the largest defect's bounding box)")
        short = min(self.size.median_hw)
        return SMALLEST_DEFECT_FRACTION * short, (f"no masks: assumed {SMALLEST_DEFECT_FRACTION:.0%} of the "
                                                  f"{short}-px short side")

    def defect_cells(self, geometry: Geometry, stride: int = GEOMETRY_FEATURE_STRIDE) -> float:
        """Feature cells (at ``stride``) the smallest defect spans in the median image under ``geometry``."""
        return feature_cells(geometry, self.size.median_hw, self.smallest_defect()[0], stride)

    def with_overrides(self, overrides: dict) -> DatasetProfile:
        """Return a copy whose facts are replaced by user-declared ones."""
        validate_overrides(overrides)
        return replace(self, overrides={**self.overrides, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON to ``path``, creating its folders. Raises :class:`UsageError` when it cannot
        be written there: a folder above it is a file, ``path`` is a folder, it is an existing file that is not JSON
        (an image, say: never overwritten), or the file system refuses."""
        path = Path(path)
        _check_profile_target(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_dict(), indent=2))
        except OSError as exc:
            raise UsageError(f"cannot write the profile to {path}: {exc.strerror or exc}") from exc
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
        values["sample_hw"] = tuple(values["sample_hw"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> DatasetProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _foreign(path: Path) -> str | None:
    """Why the existing file ``path`` must not be overwritten by a profile (None: it may be): it is not JSON text
    (an image, a document), or it is JSON that is not an automl-ad profile. An empty file and a cut-off profile
    (JSON text that does not parse) may be replaced."""
    try:
        size = path.stat().st_size
        if size == 0:
            return None
        if size > PROFILE_MAX_BYTES:
            return f"is a {size:,}-byte file, not an automl-ad profile"
        with path.open("rb") as handle:
            text = handle.read()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not text.lstrip()[:1] == b"{":
        return "is an existing file that is not JSON (not an earlier automl-ad profile)"
    try:
        data = json.loads(text)
    except ValueError:
        return None  # a profile cut off while it was written
    if isinstance(data, dict) and "schema_version" in data and "fingerprint" in data:
        return None
    return "is an existing JSON file that is not an automl-ad profile"


def _check_profile_target(path: Path) -> None:
    """Raise :class:`UsageError` unless a profile may be written to ``path`` (see :meth:`DatasetProfile.save`)."""
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write the profile to {path}: {blocking} is an existing file, not a folder")
    if path.is_dir():
        raise UsageError(f"cannot write the profile to {path}: it is a folder")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UsageError(f"cannot write the profile to {path}: it is not a regular file")
        reason = _foreign(path)
        if reason is not None:
            raise UsageError(f"{path} {reason}; it is left as it is. Choose a new file name ending in .json, or "
                             "a folder")


def profile_paths(out: str | Path, names: list[str]) -> list[Path]:
    """Where ``automl-ad profile --out OUT`` writes the profiles of the categories ``names``, checked before any
    work: OUT is a file when it exists as one or its name has a suffix (``prof.json``, ``prof.txt``), and then holds
    the one category's profile; otherwise it is a folder (made when missing) with one ``<category>.json`` each.
    Raises :class:`UsageError` when OUT names a file but there are several categories, or when a target may not be
    written (an existing file that is not a profile is never overwritten; see :meth:`DatasetProfile.save`)."""
    text = str(out)
    out = Path(out)
    as_folder = out.is_dir() or text.endswith(("/", os.sep)) or not (out.exists() or out.is_symlink()) \
        and not out.suffix
    if as_folder:
        targets = [out / f"{name}.json" for name in names]
    elif len(names) > 1:
        raise UsageError(f"--out {out} names a file, but the data holds {len(names)} categories "
                         f"({', '.join(names)}), one profile each: give --out a folder (a name without a suffix, e.g. "
                         f"{out.with_suffix('') if out.suffix else out.name + '_profiles'}), or pick one category "
                         "with --category")
    else:
        targets = [out]
    for target in targets:
        _check_profile_target(target)
    return targets


def save_profiles(profiles: list[DatasetProfile], out: str | Path) -> list[Path]:
    """Save ``profiles`` where :func:`profile_paths` puts them; returns the files written."""
    return [profile.save(target) for profile, target in zip(profiles, profile_paths(out, [p.name for p in profiles]))]


def _sample(items: list, limit: int) -> list:
    """Evenly spaced, deterministic subsample."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def structure_shape(aspect: float, short_side: int = PROFILE_RESOLUTION) -> tuple[int, int]:
    """(height, width) at which structure statistics are computed for data of median ``aspect`` (width / height):
    the aspect kept and the short side ``short_side``; beyond ``PROFILE_MAX_ASPECT`` the long side stops at that
    many short sides and the short side shrinks instead (never below 16 px)."""
    elongation = max(aspect, 1 / aspect)
    long_side = round(short_side * min(elongation, PROFILE_MAX_ASPECT))
    short = max(16, round(long_side / elongation))
    return (short, long_side) if aspect >= 1 else (long_side, short)


def _largest_defect(mask_path) -> tuple[int, tuple[int, int]] | None:
    """Short side of the bounding box of the mask's largest region, and the mask's (height, width)."""
    try:
        binary = read_mask(mask_path) > 0
    except ImageReadError:
        return None  # validated moments ago; a file that vanished since is left out of the sample
    labels, count = ndimage.label(binary)
    if not count:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    rows, cols = ndimage.find_objects((labels == largest).astype(np.int32))[0]
    return min(rows.stop - rows.start, cols.stop - cols.start), binary.shape


def _drawn_masks(dataset: Dataset) -> dict:
    """The dataset's masks that mark a defect: an empty mask (warned about when the dataset was checked) says
    nothing about defect sizes, and the geometry planner leaves it out as well."""
    return {path: check for path, check in dataset.masks.items() if check.regions}


def _defect_stats(dataset: Dataset) -> DefectStats | None:
    checks = _drawn_masks(dataset)
    if not checks:
        return None
    fractions = np.array([m.defect_fraction for m in checks.values()])
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        measured = [m for m in pool.map(_largest_defect, _sample(sorted(checks), PROFILE_SAMPLE_MASKS)) if m]
    sizes = np.array([size for size, _ in measured], float)
    relative = np.array([size / min(hw) for size, hw in measured])
    base = Geometry.squash(GEOMETRY_BASE_SIDE)
    cells = np.array([feature_cells(base, hw, size, GEOMETRY_FEATURE_STRIDE) for size, hw in measured])
    pct = lambda values, q: round(float(np.percentile(values, q)), 4) if len(values) else 0.0  # noqa: E731
    return DefectStats(
        masks=len(fractions), area_fraction_min=round(float(fractions.min()), 5),
        area_fraction_median=round(float(np.median(fractions)), 5), area_fraction_max=round(float(fractions.max()), 5),
        small_defect_share=round(float(np.mean(fractions < 0.01)), 3),
        regions_median=float(np.median([m.regions for m in checks.values()])), measured_masks=len(measured),
        size_px_p10=pct(sizes, 10), size_px_median=pct(sizes, 50), size_fraction_p10=pct(relative, 10),
        size_fraction_median=pct(relative, 50), base_cells_p10=pct(cells, 10), base_cells_median=pct(cells, 50))


def profile_dataset(dataset: Dataset, sample_images: int = PROFILE_SAMPLE_IMAGES,
                    resolution: int = PROFILE_RESOLUTION) -> DatasetProfile:
    """Compute the profile. Cheap facts use every file; structure statistics a subsample of normals at their median
    aspect ratio (short side ``resolution``, at most ``PROFILE_SAMPLE_PIXELS`` pixels in all); defect sizes a
    subsample of masks."""
    start = time.perf_counter()
    infos = [dataset.info[r.path] for r in dataset.records]
    widths = np.array([i.width for i in infos])
    heights = np.array([i.height for i in infos])
    aspects = widths / heights
    shape = structure_shape(float(np.median(aspects)), resolution)
    normals = dataset.normal_in("train") or dataset.normal
    # blank frames (every pixel alike; warned about when the dataset was checked) have no structure or colour
    normals = [r for r in normals if not dataset.info[r.path].constant] or normals
    sample = _sample(normals, min(sample_images, max(1, PROFILE_SAMPLE_PIXELS // (shape[0] * shape[1]))))
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        full_scale = dataset.full_scale
        images = np.stack(list(pool.map(lambda r: load_image(r.path, shape, gray=True, full_scale=full_scale),
                                        sample)))

    pictured = [i for i in infos if not i.constant] or infos
    gray = sum(i.channels == 1 for i in pictured)
    colour = len(pictured) - gray
    effectively_gray = sum(i.effectively_gray for i in pictured)
    truly_colour = colour - effectively_gray
    mode = "gray" if truly_colour == 0 else "color" if truly_colour == len(pictured) else "mixed"

    counts = Counts(normal_train=len(dataset.normal_in("train")), normal_test=len(dataset.normal_in("test")),
                    normal_unsplit=len(dataset.normal_in(None)), abnormal=dataset.defect_types,
                    masks=len(_drawn_masks(dataset)),
                    skipped_files=sum(p.severity == "error" and p.path is not None for p in dataset.problems))
    return DatasetProfile(
        name=dataset.name, root=str(dataset.root), layout=dataset.layout, fingerprint=dataset.fingerprint(),
        counts=counts,
        size=SizeStats(int(widths.min()), float(np.median(widths)), int(widths.max()), int(heights.min()),
                       float(np.median(heights)), int(heights.max()), len(set(zip(widths, heights))),
                       *(round(float(np.percentile(aspects, q)), 4) for q in (50, 10, 90))),
        color=ColorStats(mode, int(gray), int(colour), int(effectively_gray),
                         sorted({i.bit_depth for i in infos}), full_scale),
        structure=structure_stats(images), alignment=alignment_stats(images), defects=_defect_stats(dataset),
        sample_images=len(sample), sample_resolution=min(shape), sample_hw=shape,
        profiling_seconds=round(time.perf_counter() - start, 2),
        shortcuts=[p.problem for p in dataset.problems if p.check == LABEL_SHORTCUT])
