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

import difflib
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.data.io import is_image_file
from automl_ad.errors import InvalidDatasetError

NORMAL_LABEL = "good"
#: Names of the folder of normal (defect-free) images, compared without case: "good" (MVTec), "ok" (the OK / NG
#: folders of factory inspection), "normal", "pass". Its images are labelled :data:`NORMAL_LABEL`.
NORMAL_FOLDER_NAMES = ("good", "ok", "normal", "pass")
_MASK_DIRS = ("masks", "mask", "ground_truth")
#: How many skipped entries a warning names; the rest are counted (and logged one by one at --verbose).
SKIPPED_SHOWN = 5
#: Suffixes of image formats automl-ad does not read: files named so are reported as skipped, not as non-images.
UNSUPPORTED_IMAGE_SUFFIXES = (
    ".webp", ".gif", ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".jpf", ".jfif", ".jpe",
    ".pbm", ".pgm", ".ppm", ".pnm", ".pfm", ".tga", ".ico", ".psd", ".dib", ".pcx", ".qoi", ".dds", ".exr", ".hdr",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw", ".svg",
)


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
    #: Entries of image folders that were not read, each with the reason: broken or looping links, links to
    #: folders, FIFOs and device files, unreadable folders, image formats automl-ad does not read.
    skipped: list[tuple[Path, str]] = field(default_factory=list)


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
        raise InvalidDatasetError(_missing(root))
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


def category_root(root: str | Path, category: str | None) -> Path:
    """``root``, or its category ``category`` (``--category``). A single-category dataset has no categories: a
    ``category`` of one (its ``train`` folder, say) is refused, since it would open part of the dataset as if it
    were all of it."""
    root = Path(root).expanduser()
    if category is None:
        return root
    layout = detect_layout(root) if (root / category).exists() and root.is_dir() else None
    if layout is not None:  # a missing one is explained by the scan (see _missing)
        raise InvalidDatasetError(f"{root} is a single-category dataset ({layout} layout), so '{category}' is one of "
                                  f"its folders, not a category: opening it alone would leave out the rest of the "
                                  f"dataset. Leave out --category to use {root} as a whole.")
    return root / category


def _missing(root: Path) -> str:
    """Why ``root`` cannot be opened, when it does not exist: a category (``--category``) its parent lacks is named
    with the categories the parent does hold, or with the note that the parent is a single-category dataset."""
    generic = f"{root} does not exist. Pass the folder that holds your images."
    parent = root.parent
    try:
        if not parent.is_dir() or parent == root:
            return generic
        layout = detect_layout(parent)
        if layout is not None:
            return (f"{root} does not exist: {parent} has no category '{root.name}'; it is a single-category "
                    f"dataset ({layout} layout). Leave out --category, or pass {parent} itself.")
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and detect_layout(p) is not None)
    except (OSError, InvalidDatasetError):
        return generic
    if not names:
        return generic
    close = difflib.get_close_matches(root.name, names, n=1) or [n for n in names if n.lower() == root.name.lower()]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    shown = ", ".join(names[:30]) + (f" and {len(names) - 30} more" if len(names) > 30 else "")
    return (f"{root} does not exist: {parent} has no category '{root.name}'. Its categories are: {shown}.{hint}")


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


def skip_reason(path: Path) -> str | None:
    """Why the entry ``path`` cannot be read as a file (None: a regular file, or a link to one). Only ``stat`` and
    ``readlink`` are used: a FIFO or device is never opened, so the scan cannot hang on one."""
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"broken symbolic link, its target {target} does not exist"
        return f"cannot be read, {exc.strerror or exc}"
    link = "symbolic link to " if path.is_symlink() else ""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{link}a folder, which is not followed" if link else None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return f"{link}{kind}, not a regular file"


def walk_files(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Regular files under ``folder`` (recursively, in sorted order; names starting with "." are left out, as are
    folders reached through symbolic links). Every other entry is appended to ``skipped`` with its reason
    (:func:`skip_reason`); so is a sub-folder that cannot be listed."""
    files = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                children = list(entries)
        except OSError as exc:
            skipped.append((Path(current), f"folder cannot be read, {exc.strerror or exc}"))
            continue
        for entry in children:
            path = Path(entry.path)
            try:
                real_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_folder = False
            if real_folder:
                pending.append(path)
            elif not entry.name.startswith("."):
                reason = skip_reason(path)
                if reason is None:
                    files.append(path)
                else:
                    skipped.append((path, reason))
    return sorted(files)


def _loose_files(folder: Path, ignored: list[Path], skipped: list[tuple[Path, str]]) -> None:
    """Sort the entries of ``folder`` that are not folders (nor hidden) into ``ignored`` files (no images are read
    here) and ``skipped`` entries (:func:`skip_reason`)."""
    for path in folder.iterdir():
        if path.name.startswith(".") or path.is_dir():
            continue
        reason = skip_reason(path)
        if reason is None:
            ignored.append(path)
        else:
            skipped.append((path, reason))


def _split_images(folder: Path, ignored: list[Path], skipped: list[tuple[Path, str]]) -> list[Path]:
    images = []
    for path in walk_files(folder, skipped):
        if is_image_file(path):
            images.append(path)
        elif path.suffix.lower() in UNSUPPORTED_IMAGE_SUFFIXES:
            skipped.append((path, f"unsupported image format '{path.suffix}' (automl-ad reads PNG, JPEG, BMP and "
                                  "TIFF)"))
        else:
            ignored.append(path)
    return images


def image_files(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under ``folder`` (recursively, sorted; as a dataset scan finds them) and the entries skipped
    with their reasons (:func:`walk_files`; images in formats automl-ad does not read among them). Other files
    are neither."""
    skipped: list[tuple[Path, str]] = []
    images = _split_images(Path(folder), [], skipped)
    return images, sorted(skipped)


def describe_skipped(skipped: list[tuple[Path, str]], root: Path | None = None, where: str = "",
                     shown: int = SKIPPED_SHOWN, listed: str = "") -> str:
    """Say how many entries (``where``: "in its image folders") were skipped, and name the ``shown`` first with
    their reasons (paths relative to ``root`` where they lie in it), then how many more (and ``listed``: where the
    rest are listed)."""
    def name(path: Path) -> str:
        if root is not None:
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                pass
        return str(path)

    count = len(skipped)
    named = "; ".join(f"{name(path)}: {reason}" for path, reason in skipped[:shown])
    rest = f"; and {count - shown} more" + (f" ({listed})" if listed else "") if count > shown else ""
    where = f" {where}" if where else ""
    return f"{count} entr{'y' if count == 1 else 'ies'}{where} {'was' if count == 1 else 'were'} skipped. {named}{rest}"


def _scan_category(root: Path, layout: str) -> RawCategory:
    if layout == "mvtec":
        return _scan_mvtec(root)
    if layout == "plain":
        return _scan_plain(root)
    ignored: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    records = [ImageRecord(p, NORMAL_LABEL) for p in _split_images(root, ignored, skipped)]
    return RawCategory(root.name, root, "flat", records, ignored_files=ignored, skipped=sorted(skipped))


def _mask_index(mask_root: Path, ignored: list[Path],
                skipped: list[tuple[Path, str]]) -> dict[tuple[str, str], Path]:
    """Map (defect type, image stem) to the mask file, accepting ``<stem>_mask`` and ``<stem>`` names."""
    index: dict[tuple[str, str], Path] = {}
    if not mask_root.is_dir():
        return index
    for path in _split_images(mask_root, ignored, skipped):
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
    skipped: list[tuple[Path, str]] = []
    empty: list[Path] = []
    records = []
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        normal = normal_folder(split_dir)
        for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = _split_images(label_dir, ignored, skipped)
            if not images:
                empty.append(label_dir)
            records += [ImageRecord(p, _label(label_dir, normal), split) for p in images]
        _loose_files(split_dir, ignored, skipped)
    records, orphans = _attach_masks(records, _mask_index(root / "ground_truth", ignored, skipped))
    _loose_files(root, ignored, skipped)
    return RawCategory(root.name, root, "mvtec", records, orphans, sorted(set(ignored)), empty, sorted(set(skipped)))


def _scan_plain(root: Path) -> RawCategory:
    ignored: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    empty: list[Path] = []
    records = []
    mask_root = next((root / name for name in _MASK_DIRS if (root / name).is_dir()), None)
    normal = normal_folder(root)
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if label_dir == mask_root:
            continue
        images = _split_images(label_dir, ignored, skipped)
        if not images:
            empty.append(label_dir)
        records += [ImageRecord(p, _label(label_dir, normal)) for p in images]
    masks = _mask_index(mask_root, ignored, skipped) if mask_root else {}
    records, orphans = _attach_masks(records, masks)
    _loose_files(root, ignored, skipped)
    return RawCategory(root.name, root, "plain", records, orphans, sorted(set(ignored)), empty, sorted(set(skipped)))
