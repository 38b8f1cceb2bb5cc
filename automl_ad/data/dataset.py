"""The validated dataset: records, image facts, fingerprint, and train/validation/test splits."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from automl_ad.data.io import ImageInfo, full_scale_of, load_image
from automl_ad.data.layout import ImageRecord, category_root, detect_layout, scan
from automl_ad.data.validation import MaskCheck, Problem, validate
from automl_ad.defaults import DEFECT_VALIDATION_FRACTION, SPLIT_SEED, VALIDATION_FRACTION
from automl_ad.errors import InvalidDatasetError


@dataclass(frozen=True)
class DataSplit:
    """Images for fitting (normal only), for selecting models (validation) and for the final report (test)."""

    train: list[ImageRecord]
    validation: list[ImageRecord]
    test: list[ImageRecord]


@dataclass
class Dataset:
    """One validated category. Records are the usable images only; ``problems`` lists what was found."""

    name: str
    root: Path
    layout: str
    records: list[ImageRecord]
    info: dict[Path, ImageInfo]
    masks: dict[Path, MaskCheck] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def normal(self) -> list[ImageRecord]:
        return [r for r in self.records if r.is_normal]

    @property
    def abnormal(self) -> list[ImageRecord]:
        return [r for r in self.records if not r.is_normal]

    @property
    def defect_types(self) -> dict[str, int]:
        """Defect type → number of images, in name order."""
        return dict(sorted(Counter(r.label for r in self.abnormal).items()))

    @cached_property
    def full_scale(self) -> int | None:
        """What its 16-bit images are divided by to reach [0, 1]: the full scale of the smallest camera bit depth
        that holds their largest value (:func:`~automl_ad.data.io.full_scale_of`; 4095 for a 12-bit camera); None
        when it has no 16-bit image or they use the whole 16-bit range (65535, the default)."""
        values = [self.info[r.path].max_value for r in self.records if self.info[r.path].bit_depth == 16]
        scale = full_scale_of(max(values)) if values else None
        return None if scale in (None, 65535) else scale

    def normal_in(self, split: str | None) -> list[ImageRecord]:
        return [r for r in self.normal if r.split == split]

    def fingerprint(self) -> str:
        """Content hash of the usable images with their labels and declared splits (paths relative to the root)."""
        digest = hashlib.sha256()
        for record in sorted(self.records, key=lambda r: str(r.path)):
            relative = record.path.relative_to(self.root).as_posix()
            digest.update(f"{relative}\t{record.label}\t{record.split}\t{self.info[record.path].sha256}\n".encode())
        return digest.hexdigest()[:16]

    def split(self, validation_fraction: float = VALIDATION_FRACTION,
              defect_validation_fraction: float = DEFECT_VALIDATION_FRACTION, seed: int = SPLIT_SEED,
              min_test_normals: int = 0) -> DataSplit:
        """Deterministic split. Normal training images → train + validation. Declared test images, normal and
        defective, are divided between validation and test as labelled defects are (``defect_validation_fraction``
        to validation): the declared test normals may differ from the training ones (another day, another batch),
        and validation should see what test sees. Without a declared split a share of the normals is held out for
        test; without labelled defects too, fewer of those than ``min_test_normals`` train instead. Labelled defects
        of each type are divided between validation (model selection) and test (final report); the test part never
        feeds selection.
        """
        if not 0 <= validation_fraction < 1 or not 0 <= defect_validation_fraction <= 1:
            raise ValueError("split fractions must lie in [0, 1)")
        rng = np.random.default_rng(seed)
        declared = any(r.split is not None for r in self.normal)
        pool = self.normal_in("train") if declared else self.normal
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n_val = int(round(len(pool) * validation_fraction))
        n_test = 0 if declared or (not self.abnormal and n_val < min_test_normals) else n_val
        if len(pool) - n_val - n_test < 1:
            raise InvalidDatasetError(f"{self.root}: only {len(pool)} normal training image(s); at least "
                                      f"{n_val + n_test + 1} are needed for the requested split")
        validation, test = pool[:n_val], pool[n_val:n_val + n_test]
        train = pool[n_val + n_test:]
        if declared:
            declared_test = self.normal_in("test")
            moved = int(len(declared_test) * defect_validation_fraction)
            # its own generator: the defects' split below stays what it was for datasets that move none
            chosen = set(np.random.default_rng([seed, 1]).permutation(len(declared_test))[:moved].tolist())
            validation += [r for i, r in enumerate(declared_test) if i in chosen]
            test += [r for i, r in enumerate(declared_test) if i not in chosen]
        for label in self.defect_types:
            items = [r for r in self.abnormal if r.label == label]
            items = [items[i] for i in rng.permutation(len(items))]
            k = int(round(len(items) * defect_validation_fraction))
            validation += items[:k]
            test += items[k:]
        order = {r.path: i for i, r in enumerate(self.records)}
        return DataSplit(*(sorted(part, key=lambda r: order[r.path]) for part in (train, validation, test)))

    def holdout_split(self, seed: int = SPLIT_SEED) -> DataSplit:
        """Fit/test split without a validation part: the declared train normals (or 80% of undeclared normals)
        for fitting; declared test images (or the other 20% and every defect) for testing."""
        declared = any(r.split is not None for r in self.normal)
        split = self.split(validation_fraction=0.0 if declared else 0.2, defect_validation_fraction=0.0, seed=seed)
        if declared:
            return split
        held_out = set(r.path for r in split.test)
        train = [r for r in self.normal if r.path not in held_out]
        return DataSplit(train, [], split.test)

    def load(self, records: list[ImageRecord], size: int | tuple[int, int], gray: bool = False) -> np.ndarray:
        """Load images as a float32 array ``(N, H, W[, 3])`` in [0, 1] at a common size.

        Gray images are repeated to three channels unless ``gray`` is set (then colour images become luma).
        """
        images = []
        for record in records:
            image = load_image(record.path, size, gray=gray, full_scale=self.full_scale)
            if not gray and image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            images.append(image)
        return np.stack(images) if images else np.empty((0,), np.float32)


def load_datasets(root: str | Path, strict: bool = False, progress: bool = False) -> list[Dataset]:
    """Scan ``root`` and validate every category it holds (one :class:`Dataset` each)."""
    datasets = []
    for raw in scan(root):
        records, info, masks, problems = validate(raw, strict=strict, progress=progress)
        datasets.append(Dataset(raw.name, raw.root, raw.layout, records, info, masks, problems))
    return datasets


def open_dataset(root: str | Path, category: str | None = None, strict: bool = False,
                 progress: bool = False) -> Dataset:
    """Open a single category: ``root`` itself, or ``category`` inside a multi-category root."""

    root = category_root(root, category)
    if category is None and root.is_dir() and detect_layout(root) is None:
        names = [raw.name for raw in scan(root)]
        if len(names) > 1:
            raise InvalidDatasetError(f"{root} holds {len(names)} categories ({', '.join(names)}); "
                                      "choose one with --category NAME")
    return load_datasets(root, strict=strict, progress=progress)[0]
