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

    def header(self, key: str) -> tuple[list[tuple[int, ...]], dict] | None:
        """The shapes of a cached pyramid's levels and the metadata it was stored with, read without its arrays;
        None when absent or unreadable (counted as a hit or a miss)."""
        entry = self._read(key, arrays=False)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def get(self, key: str) -> list[np.ndarray] | None:
        """The cached feature pyramid, or None."""
        entry = self._read(key, arrays=True)
        return None if entry is None else entry[0]

    def _read(self, key: str, arrays: bool) -> tuple[list, dict] | None:
        """(arrays, or their shapes; metadata) of an entry; refreshes its time (least recently used go first)."""
        if not self.enabled:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
                names = [f"level{i}" for i in range(len(handle.keys()))]
                levels = [handle.get_tensor(name) if arrays else tuple(handle.get_slice(name).get_shape())
                          for name in names]
            os.utime(path)
        except Exception as exc:  # noqa: BLE001 - a damaged (or just evicted) entry is recomputed, never trusted
            log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
            return None
        return levels, meta

    def put(self, key: str, arrays: list[np.ndarray], meta: dict | None = None) -> None:
        if not self.enabled:
            return
        from safetensors.numpy import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".safetensors")
        os.close(handle)
        try:
            save_file({f"level{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}, tmp,
                      metadata={"meta": json.dumps(meta or {}, sort_keys=True)})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def trim(self, max_mb: float) -> int:
        """Delete the least recently used entries until the cache holds at most ``max_mb``; returns how many."""
        if not self.root.is_dir():
            return 0
        entries = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_atime)
        total, removed = sum(p.stat().st_size for p in entries) / 2**20, 0
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
    Cached rows are read straight into the result (at most one image's arrays besides it)."""
    if not len(images):
        return extractor.features_of(images)
    cache = cache if cache is not None else FeatureCache()
    spec_key = extractor.spec.key()
    keys = [cache.key(spec_key, fingerprint) for fingerprint in images.image_fingerprints()]
    start = time.perf_counter()
    headers = [cache.header(key) for key in keys]
    loading_s = time.perf_counter() - start
    missing = [i for i, header in enumerate(headers) if header is None]
    computed, computed_rows = _compute(extractor, images, missing, keys, spec_key, cache) if missing else (None, [])
    if len(missing) == len(images):
        return computed
    rows = {i: header[0][0][0] for i, header in enumerate(headers) if header is not None}
    rows.update(zip(missing, computed_rows))
    offsets = np.cumsum([0] + [rows[i] for i in range(len(images))])
    shapes = next(header[0] for header in headers if header is not None)
    out = [np.empty((int(offsets[-1]), *shape[1:]), np.float32) for shape in shapes]
    if missing:
        starts = np.cumsum([0, *computed_rows])
        for j, i in enumerate(missing):
            for level, part in zip(out, computed):
                level[offsets[i]:offsets[i + 1]] = part[starts[j]:starts[j + 1]]
        del computed
    loaded, saved_s = 0, 0.0
    for i, header in enumerate(headers):
        if header is None:
            continue
        start = time.perf_counter()
        arrays = cache.get(keys[i])
        loading_s += time.perf_counter() - start
        if arrays is None or [a.shape for a in arrays] != [(rows[i], *s[1:]) for s in shapes]:
            arrays = extractor.features_of(images.subset([i]))  # evicted or replaced since its header was read
        else:
            loaded, saved_s = loaded + 1, saved_s + float(header[1].get("compute_s", 0.0))
        for level, part in zip(out, arrays):
            level[offsets[i]:offsets[i + 1]] = part
    FEATURE_TIMES.loaded_images += loaded
    FEATURE_TIMES.loaded_s += loading_s
    FEATURE_TIMES.saved_s += max(0.0, saved_s - loading_s)
    return out


def _compute(extractor, images, missing: list[int], keys: list[str], spec_key: dict,
             cache) -> tuple[list[np.ndarray], list[int]]:
    """Features of the images at ``missing``, computed in one pass and stored per image; with their rows each."""
    start = time.perf_counter()
    subset = images if len(missing) == len(images) else images.subset(missing)
    computed = extractor.features_of(subset)
    seconds = time.perf_counter() - start
    FEATURE_TIMES.computed_images += len(missing)
    FEATURE_TIMES.computed_s += seconds
    rows = _rows_per_image(subset, extractor.spec.geometry)
    if sum(rows) != len(computed[0]):
        raise RuntimeError(f"feature extraction gave {len(computed[0])} rows for {len(missing)} images, whose "
                           f"geometry has {sum(rows)} network inputs")
    starts = np.cumsum([0, *rows])
    for j, i in enumerate(missing):
        cache.put(keys[i], [level[starts[j]:starts[j + 1]] for level in computed],
                  {"spec": spec_key, "rows": rows[j], "compute_s": round(seconds / len(missing), 5)})
    return computed, rows


def _rows_per_image(images, geometry) -> list[int]:
    """Network inputs per image: one for a squash or letterbox, a tile grid's count for tiles."""
    if geometry is None or geometry.mode != "tile":
        return [1] * len(images)
    return [grid.n_tiles for grid in images.grids(geometry)]
