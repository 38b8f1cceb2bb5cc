"""Output folders written whole (``export``'s package, ``fit``'s model) without ever deleting a user's files.

The folder is filled in a staging folder next to the target, then swapped in: an existing target is renamed
aside, the new folder renamed in, and the old one deleted only after that succeeded, so a failure at any point
leaves the old folder as it was. An existing non-empty target is replaced only with ``overwrite`` and only when
``replaceable`` recognises it as a folder of that kind (a package, a saved model); the working directory, its
parents, the home folder, the filesystem root, a folder holding a ``protected`` path (tracking store, working
state) or automl-ad's state, and a path that is a file or a symbolic link are never targets.

Folders that grow (the feature cache, a search's saved models) ask :func:`disk_cap_mb` how large they may be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from automl_ad.defaults import DISK_RESERVE_MB, DISK_RESERVE_SHARE, STATE_DIR
from automl_ad.errors import UsageError

log = logging.getLogger(__name__)

#: Names that mark a tracking store or automl-ad's working state: a folder holding one is never replaced.
STORE_MARKERS = (STATE_DIR, "mlruns", "mlflow.db")

#: Says why an existing folder is not one this command wrote (None: it is, and may be replaced).
Recogniser = Callable[[Path], "str | None"]


def check_output_folder(out: str | Path, *, what: str, replaceable: Recogniser, overwrite: bool,
                        protected: Iterable[str | Path] = ()) -> Path:
    """Raise UsageError unless ``out`` may receive a new ``what`` (see the module docstring); returns it resolved."""
    out = Path(out)
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; give the {what} a real folder path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is an existing file, not a folder; choose a new folder for the {what}")
    target = out.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor) or target == home or home.is_relative_to(target):
        raise UsageError(f"{out} is the home folder, the filesystem root or a parent of them; choose a new "
                         f"folder for the {what}")
    if cwd.is_relative_to(target):
        raise UsageError(f"{out} is the working directory or one of its parents; choose a new folder for the "
                         f"{what}")
    for path in protected:
        held = Path(path).resolve()
        if held.is_relative_to(target):
            raise UsageError(f"{out} holds {held}, which automl-ad needs (tracking store, working state or "
                             f"dataset); choose a new folder for the {what}")
    if not target.exists() or not any(target.iterdir()):
        return target
    _refuse_stores(out, target, what, deep=False)
    problem = replaceable(target)
    if problem:
        raise UsageError(f"{out} already holds files and is not an automl-ad {what} ({problem}); --overwrite "
                         f"replaces only an automl-ad {what}, so choose a new or empty folder")
    _refuse_stores(out, target, what, deep=True)  # a recognised folder is small: look inside its subfolders too
    if not overwrite:
        raise UsageError(f"{out} already holds an automl-ad {what}; pass --overwrite to replace it, or choose "
                         "another folder")
    return target


def _refuse_stores(out: Path, target: Path, what: str, deep: bool) -> None:
    markers = []
    for folder, dirs, files in os.walk(target):  # links are not followed
        markers += [str(Path(folder, name).relative_to(target)) for name in dirs + files if name in STORE_MARKERS]
        dirs[:] = [name for name in dirs if deep and name not in STORE_MARKERS]
    if markers:
        raise UsageError(f"{out} holds a tracking store or automl-ad's working state ({', '.join(markers[:3])}); "
                         f"choose a new folder for the {what}")


def write_output_folder(out: str | Path, fill: Callable[[Path], None], *, what: str, replaceable: Recogniser,
                        overwrite: bool, protected: Iterable[str | Path] = ()) -> Path:
    """Check ``out`` (:func:`check_output_folder`), let ``fill`` write the new folder into a staging folder next
    to it, check again (it may have changed meanwhile) and swap it in; returns ``out``."""
    protected = tuple(protected)
    target = check_output_folder(out, what=what, replaceable=replaceable, overwrite=overwrite, protected=protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the result from other users (e.g. a server)
    try:
        fill(staging)
        for path in staging.rglob("*"):  # safetensors writes its files 0600: as open() would, for the same reason
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o666 & ~umask)
        check_output_folder(out, what=what, replaceable=replaceable, overwrite=overwrite, protected=protected)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # our own staging folder; gone already after a swap
    return Path(out)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``target`` (if any) aside, ``staging`` into its place, then delete the old one; on a failed rename
    the old folder is put back."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        log.warning("the replaced folder %s could not be removed (%s); delete it by hand", aside, exc)


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` (its folder made) through a temporary file renamed over it, so that a reader
    or a kill never finds half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def disk_cap_mb(folder: Path, used_mb: float, cap_mb: float) -> float:
    """What a growing folder holding ``used_mb`` may hold: ``cap_mb``, less what would take its disk's free space
    below the reserve (``DISK_RESERVE_MB`` or ``DISK_RESERVE_SHARE`` of the disk, the larger)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    reserve_mb = max(DISK_RESERVE_MB, DISK_RESERVE_SHARE * usage.total / 2**20)
    return max(0.0, min(cap_mb, used_mb + usage.free / 2**20 - reserve_mb))
