"""Recognise dataset folder layouts and list their images, labels and masks.

Supported layouts (see README):

* ``mvtec`` — ``train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``;
* ``plain`` — ``good/`` plus one sub-folder per defect type, optional ``masks/<type>/<stem>[_mask].<ext>``;
  the normal folder may also be named as in :data:`NORMAL_FOLDER_NAMES` (``OK/`` beside ``NG/``), in any case;
* ``flat`` — a folder holding only images: all are treated as normal;
* a root whose sub-folders are categories in any of the layouts above (each handled separately).

Nothing here decodes images; validation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.data.io import is_image_file
from automl_ad.errors import InvalidDatasetError

NORMAL_LABEL = "good"
#: Names of the folder of normal (defect-free) images, compared without case: "good" (MVTec), "ok" (the OK / NG
#: folders of factory inspection), "normal", "pass". Its images are labelled :data:`NORMAL_LABEL`.
NORMAL_FOLDER_NAMES = ("good", "ok", "normal", "pass")
_MASK_DIRS = ("masks", "mask", "ground_truth")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: where it is, its label (``good`` or a defect type), its declared split, its mask."""

    path: Path
    label: str
    split: str | None = None  # "train" / "test" as declared by the layout; None for plain and flat layouts
    mask: Path | None = None

    @property
    def is_normal(self) -> bool:
        return self.label == NORMAL_LABEL


@dataclass
class RawCategory:
    """What the layout scan found before validation: records, orphan masks, ignored files, empty folders."""

    name: str
    root: Path
    layout: str
    records: list[ImageRecord]
    orphan_masks: list[Path] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)
    empty_dirs: list[Path] = field(default_factory=list)


def detect_layout(root: Path) -> str | None:
    """Return ``mvtec``, ``plain``, ``flat`` or None if ``root`` is none of them (it may hold categories)."""
    if normal_folder(root / "train") is not None:
        return "mvtec"
    if normal_folder(root) is not None:
        return "plain"
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if entries and not any(p.is_dir() for p in entries) and any(is_image_file(p) for p in entries):
        return "flat"
    return None


def scan(root: str | Path) -> list[RawCategory]:
    """Find every category under ``root`` (``root`` itself, or its sub-folders when it is a multi-category root)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise InvalidDatasetError(f"{root} does not exist. Pass the folder that holds your images.")
    if not root.is_dir():
        raise InvalidDatasetError(f"{root} is a file, not a folder. Pass the folder that holds your images.")
    root = root.resolve()
    layout = detect_layout(root)
    if layout is not None:
        return [_scan_category(root, layout)]
    categories = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        child_layout = detect_layout(child)
        if child_layout is not None:
            categories.append(_scan_category(child, child_layout))
    if not categories:
        raise InvalidDatasetError(
            f"{root} is not a dataset folder automl-ad recognises. Use one of:\n"
            "  MVTec style: train/good/*.png, test/<defect_type>/*.png, ground_truth/<defect_type>/<name>_mask.png\n"
            "  plain:       good/*.png (or OK/, normal/, pass/) plus one folder per defect type, optional "
            "masks/<defect_type>/<name>.png\n"
            "  flat:        a folder of normal images only\n"
            "  or a folder whose sub-folders are categories in one of these layouts."
        )
    return categories


def normal_folder(parent: Path) -> Path | None:
    """The sub-folder of ``parent`` that holds normal images (named as in :data:`NORMAL_FOLDER_NAMES`), None when
    there is none; two such folders are refused, since either could be meant."""
    if not parent.is_dir():
        return None
    found = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() in NORMAL_FOLDER_NAMES)
    if len(found) > 1:
        raise InvalidDatasetError(f"{parent} has {len(found)} folders of normal images "
                                  f"({', '.join(p.name + '/' for p in found)}). Merge them into one.")
    return found[0] if found else None


def _label(folder: Path, normal: Path | None) -> str:
    """The label of the images in ``folder``: normal in the normal folder, else the folder's name (a defect type)."""
    return NORMAL_LABEL if folder == normal else folder.name


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _split_images(folder: Path, ignored: list[Path]) -> list[Path]:
    images = []
    for path in _files(folder):
        (images if is_image_file(path) else ignored).append(path)
    return images


def _scan_category(root: Path, layout: str) -> RawCategory:
    if layout == "mvtec":
        return _scan_mvtec(root)
    if layout == "plain":
        return _scan_plain(root)
    ignored: list[Path] = []
    records = [ImageRecord(p, NORMAL_LABEL) for p in _split_images(root, ignored)]
    return RawCategory(root.name, root, "flat", records, ignored_files=ignored)


def _mask_index(mask_root: Path, ignored: list[Path]) -> dict[tuple[str, str], Path]:
    """Map (defect type, image stem) to the mask file, accepting ``<stem>_mask`` and ``<stem>`` names."""
    index: dict[tuple[str, str], Path] = {}
    if not mask_root.is_dir():
        return index
    for path in _split_images(mask_root, ignored):
        relative = path.relative_to(mask_root)
        defect_type = relative.parts[0] if len(relative.parts) > 1 else ""
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        index[(defect_type, stem)] = path
    return index


def _attach_masks(
        records: list[ImageRecord], masks: dict[tuple[str, str], Path]) -> tuple[list[ImageRecord], list[Path]]:
    used: set[Path] = set()
    attached = []
    for record in records:
        mask = None if record.is_normal else masks.get((record.label, record.path.stem))
        if mask is not None:
            used.add(mask)
        attached.append(ImageRecord(record.path, record.label, record.split, mask))
    orphans = sorted(set(masks.values()) - used)
    return attached, orphans


def _scan_mvtec(root: Path) -> RawCategory:
    ignored: list[Path] = []
    empty: list[Path] = []
    records = []
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        normal = normal_folder(split_dir)
        for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = _split_images(label_dir, ignored)
            if not images:
                empty.append(label_dir)
            records += [ImageRecord(p, _label(label_dir, normal), split) for p in images]
        ignored += [p for p in split_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    records, orphans = _attach_masks(records, _mask_index(root / "ground_truth", ignored))
    ignored += [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    return RawCategory(root.name, root, "mvtec", records, orphans, sorted(set(ignored)), empty)


def _scan_plain(root: Path) -> RawCategory:
    ignored: list[Path] = []
    empty: list[Path] = []
    records = []
    mask_root = next((root / name for name in _MASK_DIRS if (root / name).is_dir()), None)
    normal = normal_folder(root)
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if label_dir == mask_root:
            continue
        images = _split_images(label_dir, ignored)
        if not images:
            empty.append(label_dir)
        records += [ImageRecord(p, _label(label_dir, normal)) for p in images]
    masks = _mask_index(mask_root, ignored) if mask_root else {}
    records, orphans = _attach_masks(records, masks)
    ignored += [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    return RawCategory(root.name, root, "plain", records, orphans, sorted(set(ignored)), empty)
