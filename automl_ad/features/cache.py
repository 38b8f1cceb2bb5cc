"""On-disk feature cache shared by every detector, trial and process.

Features are stored per (backbone spec, image content) as one safetensors file named by the hash of that key: an
image's rows (one per network input of the spec's geometry: several for tiles) are reused in whatever set it comes
again, so a search trial on all training images computes only what its screening trial on a share of them did
not. Writers write a temporary file and rename it into place (atomic on POSIX), so concurrent writers
never leave a partial file and readers only ever see complete ones. Reads refresh the file time, so the
least recently used entries can be evicted first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from automl_ad.defaults import FEATURE_CACHE_ENV, default_cache_dir
from automl_ad.folders import disk_cap_mb

log = logging.getLogger(__name__)

FORMAT_VERSION = 3


class FeatureCache:
    """A folder of cached feature pyramids. ``FeatureCache(None)`` uses ``$AUTOML_AD_CACHE_DIR`` or the default."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root = Path(root or os.environ.get(FEATURE_CACHE_ENV) or default_cache_dir()).expanduser() / "features"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(spec_key: dict, fingerprint: str) -> str:
        """The entry of the image whose content hash is ``fingerprint`` under the backbone spec ``spec_key``."""
        payload = json.dumps({"spec": spec_key, "image": fingerprint, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> list[np.ndarray] | None:
        return (self.get_with_meta(key) or (None, None))[0]

    def get_with_meta(self, key: str) -> tuple[list[np.ndarray], dict] | None:
        """The cached feature pyramid and the metadata it was stored with, or None."""
        if not self.enabled:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
                arrays = [handle.get_tensor(f"level{i}") for i in range(len(handle.keys()))]
        except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
            self.misses += 1
            return None
        os.utime(path)
        self.hits += 1
        return arrays, meta

    def put(self, key: str, arrays: list[np.ndarray], meta: dict | None = None) -> None:
        """Store an entry. The cache only saves time: when it cannot be written (disk full, a folder without write
        permission) this says so once and stops caching in this process, and the features are used all the same.
        It is not written either where it would take the disk's free space below the reserve (``disk_cap_mb``)."""
        if not self.enabled:
            return
        entry_mb = sum(a.nbytes for a in arrays) / 2**20
        if disk_cap_mb(self.root, 0.0, entry_mb) < entry_mb:
            self.enabled = False
            log.warning("the feature cache %s stops storing features in this process: its disk is nearly full. "
                        "Free disk space there, or point %s at a folder with room", self.root, FEATURE_CACHE_ENV)
            return
        from safetensors.numpy import save_file

        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".safetensors")
            os.close(handle)
            save_file({f"level{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}, tmp,
                      metadata={"meta": json.dumps(meta or {}, sort_keys=True)})
            os.replace(tmp, self._path(key))
        except OSError as exc:
            self.enabled = False
            log.warning("the feature cache %s cannot be written (%s): features are computed without it from now on "
                        "in this process. Free disk space there, or point %s at a writable folder with room",
                        self.root, exc, FEATURE_CACHE_ENV)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def trim(self, max_mb: float) -> int:
        """Delete the least recently used entries until the cache holds at most ``max_mb``, or less where the disk's
        free space is below the reserve (``disk_cap_mb``); returns how many."""
        if not self.root.is_dir():
            return 0
        entries = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_atime)
        total, removed = sum(p.stat().st_size for p in entries) / 2**20, 0
        max_mb = disk_cap_mb(self.root, total, max_mb)
        for path in entries:
            if total <= max_mb:
                break
            size = path.stat().st_size / 2**20
            path.unlink(missing_ok=True)
            total, removed = total - size, removed + 1
        return removed

    def size_mb(self) -> float:
        return sum(p.stat().st_size for p in self.root.glob("*.safetensors")) / 2**20 if self.root.is_dir() else 0.0


@dataclass
class FeatureTimes:
    """Where this process's feature extraction time went (a search trial reports it with its result)."""

    computed_images: int = 0
    computed_s: float = 0.0
    loaded_images: int = 0
    loaded_s: float = 0.0
    saved_s: float = 0.0  # for cache hits: what computing them took when they were stored, minus loading them

    def as_metrics(self) -> dict:
        return {f"features_{k}": v for k, v in asdict(self).items()}


#: Totals of the current process.
FEATURE_TIMES = FeatureTimes()


def extract_features(extractor, images, cache: FeatureCache | None = None) -> list[np.ndarray]:
    """Feature pyramid of an :class:`~automl_ad.data.imageset.ImageSet` (``extractor.features_of``), each image's
    rows from the cache when they were computed before, the others computed in one pass and stored per image.
    Cached rows are copied straight into the result (at most one image's arrays besides it)."""
    if not len(images):
        return extractor.features_of(images)
    cache = cache if cache is not None else FeatureCache()
    spec_key = extractor.spec.key()
    keys = [cache.key(spec_key, fingerprint) for fingerprint in images.image_fingerprints()]
    rows = _rows_per_image(images, extractor.spec.geometry)
    offsets = np.cumsum([0, *rows])
    out, missing, saved_s = None, [], 0.0
    start = time.perf_counter()
    for i, key in enumerate(keys):
        entry = cache.get_with_meta(key)
        if entry is None or len(entry[0][0]) != rows[i]:
            missing.append(i)
            continue
        arrays, meta = entry
        if out is None:
            out = [np.empty((int(offsets[-1]), *a.shape[1:]), a.dtype) for a in arrays]
        for level, part in zip(out, arrays):
            level[offsets[i]:offsets[i + 1]] = part
        saved_s += float(meta.get("compute_s", 0.0))
    if out is not None:
        loading_s = time.perf_counter() - start
        FEATURE_TIMES.loaded_images += len(images) - len(missing)
        FEATURE_TIMES.loaded_s += loading_s
        FEATURE_TIMES.saved_s += max(0.0, saved_s - loading_s)
    if not missing:
        return out
    computed = _compute(extractor, images, missing, keys, spec_key, cache, [rows[i] for i in missing])
    if out is None:
        return computed
    starts = np.cumsum([0, *(rows[i] for i in missing)])
    for j, i in enumerate(missing):
        for level, part in zip(out, computed):
            level[offsets[i]:offsets[i + 1]] = part[starts[j]:starts[j + 1]]
    return out


def _compute(extractor, images, missing: list[int], keys: list[str], spec_key: dict, cache,
             rows: list[int]) -> list[np.ndarray]:
    """Features of the images at ``missing`` (``rows`` network inputs each), computed in one pass and stored per
    image."""
    start = time.perf_counter()
    computed = extractor.features_of(images if len(missing) == len(images) else images.subset(missing))
    seconds = time.perf_counter() - start
    FEATURE_TIMES.computed_images += len(missing)
    FEATURE_TIMES.computed_s += seconds
    if sum(rows) != len(computed[0]):
        raise RuntimeError(f"feature extraction gave {len(computed[0])} rows for {len(missing)} images, whose "
                           f"geometry has {sum(rows)} network inputs")
    starts = np.cumsum([0, *rows])
    for j, i in enumerate(missing):
        cache.put(keys[i], [level[starts[j]:starts[j + 1]] for level in computed],
                  {"spec": spec_key, "rows": rows[j], "compute_s": round(seconds / len(missing), 5)})
    return computed


def _rows_per_image(images, geometry) -> list[int]:
    """Network inputs per image: one for a squash or letterbox, a tile grid's count for tiles."""
    if geometry is None or geometry.mode != "tile":
        return [1] * len(images)
    return [grid.n_tiles for grid in images.grids(geometry)]
