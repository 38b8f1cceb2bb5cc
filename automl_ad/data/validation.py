"""Validate a scanned category before any work: report every problem at once, each with file, problem and fix."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automl_ad.data.io import ImageInfo, ImageReadError, inspect_image, read_mask
from automl_ad.data.layout import ImageRecord, RawCategory, describe_skipped
from automl_ad.defaults import IO_WORKERS, SHORTCUT_AUROC, SHORTCUT_MIN_IMAGES
from automl_ad.errors import InvalidDatasetError
from automl_ad.progress import track

log = logging.getLogger(__name__)

ERROR, WARNING, NOTE = "error", "warning", "note"
#: The ``check`` of :func:`label_shortcuts`' findings (the profile keeps them).
LABEL_SHORTCUT = "label shortcut"


@dataclass(frozen=True)
class Problem:
    """One finding. ``error`` findings make the file unusable (skipped, or fatal with ``strict``)."""

    path: Path | None
    problem: str
    fix: str
    severity: str = ERROR
    check: str | None = None  # which check found it, where later steps look for its findings (LABEL_SHORTCUT)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"[{self.severity}] {where}{self.problem}. {self.fix}"

    def to_dict(self) -> dict:
        return {"path": str(self.path) if self.path else None, "problem": self.problem, "fix": self.fix,
                "severity": self.severity}


@dataclass(frozen=True)
class MaskCheck:
    """Result of checking one mask against its image."""

    problem: Problem | None
    defect_fraction: float | None = None
    regions: int | None = None


def validate(raw: RawCategory, strict: bool = False, progress: bool = False
             ) -> tuple[list[ImageRecord], dict[Path, ImageInfo], dict[Path, MaskCheck], list[Problem]]:
    """Check every file of ``raw``; return usable records, image facts, mask facts and all problems.

    Unusable files are dropped with a warning, or — with ``strict`` — an :class:`InvalidDatasetError` lists them all.
    A category without usable normal images is always an error.
    """
    problems: list[Problem] = []
    problems += [Problem(p, "is not an image file automl-ad reads; it is ignored",
                         "Nothing to do, or convert it to PNG/JPEG/BMP/TIFF if it is an image", NOTE)
                 for p in raw.ignored_files]
    problems += [Problem(p, "folder holds no images", "Add images or remove the empty folder", WARNING)
                 for p in raw.empty_dirs]
    problems += [Problem(p, "mask has no matching image; it is ignored",
                         "Check its name: a mask for test/<type>/x.png must be named <type>/x_mask.png or <type>/x.png",
                         WARNING) for p in raw.orphan_masks]
    problems += _skipped_entries(raw.root, raw.skipped)

    infos, read_problems = _inspect_all(raw.records, progress)
    problems += read_problems + _rotated_by_exif(raw.records, infos) + _blank_images(raw.records, infos)
    records = [r for r in raw.records if r.path in infos]

    mask_checks = _check_masks(records, infos, progress)
    problems += [c.problem for c in mask_checks.values() if c.problem is not None]
    records = [r if r.mask is None or mask_checks[r.mask].defect_fraction is not None
               else ImageRecord(r.path, r.label, r.split, None) for r in records]

    records, duplicate_problems = _drop_duplicates(records, infos)
    problems += duplicate_problems
    problems += _missing_masks(records)
    problems += label_shortcuts(raw.root, records, infos)

    if not any(r.is_normal for r in records):
        problems.append(Problem(raw.root, "has no usable normal (good) images",
                                "Put defect-free images in train/good (MVTec layout) or good/ (plain layout)"))
        raise InvalidDatasetError(_summary(raw.root, problems), problems)
    errors = [p for p in problems if p.severity == ERROR]
    if strict and errors:
        raise InvalidDatasetError(_summary(raw.root, problems), problems)
    for problem in problems:
        if problem.severity != NOTE:
            log.warning("%s", problem)
    return records, infos, {k: v for k, v in mask_checks.items() if v.defect_fraction is not None}, problems


def _summary(root: Path, problems: list[Problem]) -> str:
    errors = [p for p in problems if p.severity == ERROR]
    lines = [f"{root}: {len(errors)} problem(s) make the dataset unusable as it is:"]
    lines += [f"  {p}" for p in problems if p.severity != NOTE]
    return "\n".join(lines)


def _inspect_all(records: list[ImageRecord], progress: bool) -> tuple[dict[Path, ImageInfo], list[Problem]]:
    def inspect(record: ImageRecord):
        try:
            return record.path, inspect_image(record.path), None
        except ImageReadError as exc:
            return record.path, None, exc

    infos: dict[Path, ImageInfo] = {}
    problems = []
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        for path, info, error in track(pool.map(inspect, records), "Checking images", len(records), progress):
            if error is None:
                infos[path] = info
            else:
                problems.append(Problem(path, f"image {error.reason}; it is skipped",
                                        error.fix or "Re-export the file or remove it"))
    return infos, problems


def _check_masks(records: list[ImageRecord], infos: dict[Path, ImageInfo], progress: bool) -> dict[Path, MaskCheck]:
    def check(record: ImageRecord) -> tuple[Path, MaskCheck]:
        return record.mask, _check_mask(record.mask, infos[record.path])

    with_masks = [r for r in records if r.mask is not None]
    with ThreadPoolExecutor(IO_WORKERS) as pool:
        return dict(track(pool.map(check, with_masks), "Checking masks", len(with_masks), progress))


def _check_mask(mask_path: Path, image: ImageInfo) -> MaskCheck:
    from scipy import ndimage

    try:
        mask = read_mask(mask_path)
    except ImageReadError as exc:
        return MaskCheck(Problem(mask_path, f"mask {exc.reason}; the image is kept without a mask",
                                 exc.fix or "Re-export the mask or remove it"))
    if mask.shape != (image.height, image.width):
        turned = image.orientation >= 5 and mask.shape == (image.width, image.height)
        return MaskCheck(Problem(
            mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}; "
            "the image is kept without a mask" + ("; the image's EXIF orientation tag turns it by 90 degrees for "
                                                  "viewers, so the mask was likely drawn on that turned view"
                                                  if turned else ""),
            "Save the image with its rotation applied (e.g. Pillow's ImageOps.exif_transpose) so that it matches "
            "the mask" if turned else "Resize the mask with nearest-neighbour interpolation to the image size"))
    values = np.unique(mask)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        return MaskCheck(Problem(
            mask_path, f"mask is not binary ({len(values)} distinct values, e.g. {values[:4].tolist()}); "
            "the image is kept without a mask", "Save masks with 0 for normal pixels and one value (255) for defects, "
            "as PNG (JPEG compression makes masks non-binary)"))
    binary = mask > 0
    regions = int(ndimage.label(binary)[1])
    empty = None if regions else Problem(mask_path, "mask is empty although its image is labelled defective",
                                         "Draw the defect in the mask, or move the image to good/ if it has none",
                                         WARNING)
    return MaskCheck(empty, float(binary.mean()), regions)


def _skipped_entries(root: Path, skipped: list[tuple[Path, str]]) -> list[Problem]:
    """One warning naming the entries of the image folders that the scan could not read (broken or looping links,
    FIFOs, device files, unsupported image formats ...), each with its reason: the first few, then how many more
    (each is logged at --verbose)."""
    if not skipped:
        return []
    for path, reason in skipped:
        log.info("skipped %s: %s", path, reason)
    return [Problem(root, describe_skipped(skipped, root, "in its image folders",
                                           listed="run with --verbose to list them all"),
                    "Fix or remove broken links, replace links to folders and special files by regular image files, "
                    "and convert other image formats to PNG", WARNING)]


def _blank_images(records: list[ImageRecord], infos: dict[Path, ImageInfo]) -> list[Problem]:
    """One warning per image whose pixels all have the same value: a blank frame, as a failed exposure or trigger
    gives. It stays in the dataset (it is a file of its folder's label) but the profile leaves it out of its
    structure and colour statistics."""
    problems = []
    for record in records:
        info = infos.get(record.path)
        if info is None or not info.constant:
            continue
        full = 255 if info.bit_depth == 8 else 65535
        look = ("all black" if info.max_value == 0 else
                "all white" if info.max_value == full and (info.channels == 1 or info.effectively_gray) else
                "one uniform colour" if info.channels == 3 and not info.effectively_gray else "one uniform gray level")
        kind = "normal" if record.is_normal else f"'{record.label}'"
        problems.append(Problem(
            record.path, f"image is blank ({look}: every pixel has the same value), which is typical of a camera or "
            f"trigger failure; the dataset profile leaves it out of its structure and colour statistics, but it "
            f"is still used as a {kind} image", "Remove it if the capture failed, or check the camera's exposure, "
            "lighting and trigger", WARNING))
    return problems


def _rotated_by_exif(records: list[ImageRecord], infos: dict[Path, ImageInfo]) -> list[Problem]:
    """One warning for the images whose EXIF orientation tag makes viewers show them flipped or rotated: automl-ad
    (like most vision libraries) reads the stored pixels, so the parts may face other ways than the user sees."""
    tagged = [r.path for r in records if r.path in infos and infos[r.path].orientation != 1]
    if not tagged:
        return []
    return [Problem(tagged[0], f"carries an EXIF orientation tag ({len(tagged)} of {len(infos)} images do): viewers "
                    "show these images flipped or rotated, but automl-ad reads the pixels as stored",
                    "If the parts should face one way, save the images with the rotation applied (e.g. Pillow's "
                    "ImageOps.exif_transpose, or exiftran -ai) and draw masks on those", WARNING)]


def _drop_duplicates(
        records: list[ImageRecord], infos: dict[Path, ImageInfo]) -> tuple[list[ImageRecord], list[Problem]]:
    """Identical files in different splits or with different labels leak or contradict: keep one, report the rest."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[infos[record.path].sha256].append(record)
    dropped: set[Path] = set()
    problems = []
    for copies in groups.values():
        if len(copies) < 2:
            continue
        labels = {r.label for r in copies}
        splits = {r.split for r in copies}
        if len(labels) > 1:
            dropped.update(r.path for r in copies)
            problems.append(Problem(copies[0].path, "identical file also appears as "
                                    + ", ".join(str(r.path) for r in copies[1:])
                                    + f" with labels {sorted(labels)}; all copies are skipped",
                                    "Keep the file only in the folder of its true label"))
        elif len(splits) > 1:
            kept = next(r for r in copies if r.split == "train")
            for record in copies:
                if record is not kept:
                    dropped.add(record.path)
                    problems.append(Problem(record.path, f"identical to training image {kept.path}: it would leak "
                                            "training data into the test; the test copy is skipped",
                                            "Remove the duplicate from test/"))
        else:
            problems.append(Problem(copies[1].path, f"identical to {copies[0].path} ({len(copies)} copies in total)",
                                    "Remove duplicates; they add nothing", WARNING))
    return [r for r in records if r.path not in dropped], problems


#: File facts a model may notice instead of the defect: (name, the value shown, numeric features or None: the value
#: one-hot). The image size is numeric (log width and height), so sizes that differ per image rank at chance.
_FILE_FACTS = (
    ("image size", lambda r, i: f"{i.width}x{i.height}", lambda r, i: [np.log(i.width), np.log(i.height)]),
    ("file format", lambda r, i: {".jpeg": "jpg", ".tif": "tiff"}.get(r.path.suffix.lower(), r.path.suffix.lower()[1:]),
     None),
    ("colour", lambda r, i: "gray" if i.channels == 1 or i.effectively_gray else "colour", None),
    ("bit depth", lambda r, i: f"{i.bit_depth}-bit", None),
    ("alpha channel", lambda r, i: "alpha" if i.has_alpha else "no alpha", None),
)


def label_shortcuts(root: Path, records: list[ImageRecord], infos: dict[Path, ImageInfo]) -> list[Problem]:
    """One warning per file fact that on its own tells the defective images from the good ones (cross-validated
    image AUROC of a small decision tree on it at least ``SHORTCUT_AUROC``): a model may learn the fact instead of
    the defect, and its validation and test scores then overstate what it does on the line."""
    labels = np.array([0 if r.is_normal else 1 for r in records])
    if min(int(labels.sum()), int(len(labels) - labels.sum())) < SHORTCUT_MIN_IMAGES:
        return []
    problems = []
    for name, shown, numeric in _FILE_FACTS:
        values = [shown(r, infos[r.path]) for r in records]
        kinds = sorted(set(values))
        if len(kinds) < 2:
            continue
        features = (np.array([numeric(r, infos[r.path]) for r in records], float) if numeric is not None
                    else np.eye(len(kinds))[[kinds.index(v) for v in values]])
        auroc = _cross_validated_auroc(features, labels)
        if auroc < SHORTCUT_AUROC:
            continue
        good, bad = ([v for v, label in zip(values, labels) if label == side] for side in (0, 1))
        problems.append(Problem(
            root, f"the {name} alone tells the defective images from the good ones: a decision tree on the {name} "
                  f"ranks them at image AUROC {auroc:.2f} (good images: {_most_common(good)}; defective: "
                  f"{_most_common(bad)})",
            f"A model can learn the {name} instead of the defect, and its validation and test scores then overstate "
            "what it will do on the line. Capture good and defective images the same way (camera, crop, format, "
            "colour) or convert them alike before searching; otherwise read the measured accuracy as optimistic",
            WARNING, LABEL_SHORTCUT))
    return problems


def _cross_validated_auroc(features: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of a depth-3 decision tree's out-of-fold probabilities (stratified 5-fold, fixed seed)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    folds = StratifiedKFold(n_splits=min(5, int(labels.sum()), int(len(labels) - labels.sum())), shuffle=True,
                            random_state=0)
    tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=5, random_state=0)
    probabilities = cross_val_predict(tree, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, probabilities))


def _most_common(values: list[str], shown: int = 2) -> str:
    """``values`` in brief: the ``shown`` most common with their shares, and how many distinct ones in all."""
    counts = Counter(values)
    parts = [f"{value} {count / len(values):.0%}" for value, count in counts.most_common(shown)]
    return ", ".join(parts) + (f", {len(counts)} distinct in all" if len(counts) > shown else "")


def _missing_masks(records: list[ImageRecord]) -> list[Problem]:
    """Within a defect type that has masks, flag images without one (pixel metrics will skip them)."""
    by_type: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        if not record.is_normal:
            by_type[record.label].append(record)
    problems = []
    for label, items in by_type.items():
        masked = [r for r in items if r.mask is not None]
        if masked and len(masked) < len(items):
            problems += [Problem(r.path, f"defect image of type '{label}' has no mask while others of its type do",
                                 "Add its mask (pixel-level metrics skip this image)", WARNING)
                         for r in items if r.mask is None]
    return problems
