"""On-disk feature cache shared by every detector, trial and process.

Features are stored per (backbone spec, image-set fingerprint) as one safetensors file named by the hash of
that key. Writers write a temporary file and rename it into place (atomic on POSIX), so concurrent writers
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

FORMAT_VERSION = 2


class FeatureCache:
    """A folder of cached feature pyramids. ``FeatureCache(None)`` uses ``$AUTOML_AD_CACHE_DIR`` or the default."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root = Path(root or os.environ.get(FEATURE_CACHE_ENV) or default_cache_dir()).expanduser() / "features"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(spec_key: dict, fingerprint: str) -> str:
        payload = json.dumps({"spec": spec_key, "images": fingerprint, "format": FORMAT_VERSION}, sort_keys=True)
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
    """Feature pyramid of an :class:`~automl_ad.data.imageset.ImageSet`, from the cache when computed before."""
    cache = cache if cache is not None else FeatureCache()
    spec_key = extractor.spec.key()
    key = cache.key(spec_key, images.fingerprint)
    start = time.perf_counter()
    cached = cache.get_with_meta(key)
    if cached is not None:
        features, meta = cached
        seconds = time.perf_counter() - start
        FEATURE_TIMES.loaded_images += len(images)
        FEATURE_TIMES.loaded_s += seconds
        FEATURE_TIMES.saved_s += max(0.0, float(meta.get("compute_s", seconds)) - seconds)
        return features
    features = extractor.features_of(images)
    seconds = time.perf_counter() - start
    FEATURE_TIMES.computed_images += len(images)
    FEATURE_TIMES.computed_s += seconds
    cache.put(key, features, {"spec": spec_key, "images": images.fingerprint, "count": len(images),
                              "compute_s": round(seconds, 3)})
    return features
