"""Cost measurement shared by every detector family: time, latency, throughput, memory, model size.

Sizes are in MB of 2**20 bytes. Timings use :func:`time.perf_counter`; a measured callable must return
only when its work is done (e.g. synchronise the GPU inside it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_MB = 2**20
_PROC_STATUS = Path("/proc/self/status")
_PROC_STATM = Path("/proc/self/statm")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class CostReport:
    """Costs of one detector configuration; a field a family cannot measure stays None."""

    fit_seconds: float | None = None
    latency_ms_p50: float | None = None  # batch 1, after warm-up
    latency_ms_p95: float | None = None
    throughput_ips: float | None = None  # images per second at `batch_size`
    batch_size: int | None = None
    peak_rss_mb_fit: float | None = None
    peak_rss_mb_score: float | None = None
    model_mb: float | None = None  # size of the saved model directory on disk

    def to_dict(self) -> dict:
        return asdict(self)


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (reported in kB) in MB."""
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} missing from {_PROC_STATUS}")


def _current_rss_mb() -> float:
    resident_pages = int(_PROC_STATM.read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB


def _lifetime_peak_mb() -> float:
    import resource  # Unix only; needed only where /proc is missing

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / _MB if sys.platform == "darwin" else peak / 1024


class PeakRss:
    """Context manager measuring the peak resident memory (MB) of this process during its block.

    ``method`` after entering says how:

    * ``"vmhwm"``: the kernel's peak counter (``VmHWM``), reset at block start by writing "5" to
      ``/proc/self/clear_refs``. Exact, no overhead.
    * ``"sampling"``: a background thread reads current RSS from ``/proc/self/statm`` every
      ``interval_s``; a peak shorter than the interval (or inside one C call holding the GIL) can be missed.
    * ``"ru_maxrss"``: without /proc, the process-lifetime peak; an upper bound that cannot be reset.

    The counter is process-wide: other threads count, and nesting blocks resets an outer "vmhwm" block.
    After the block: ``start_mb`` (RSS at entry), ``peak_mb`` and ``increase_mb`` (peak minus start).
    """

    def __init__(self, method: str = "auto", interval_s: float = 0.005):
        if method not in ("auto", "vmhwm", "sampling"):
            raise ValueError(f"method must be 'auto', 'vmhwm' or 'sampling', got {method!r}")
        self.method = method
        self.interval_s = interval_s
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def increase_mb(self) -> float | None:
        return None if self.peak_mb is None else self.peak_mb - self.start_mb

    def _try_reset_hwm(self) -> bool:
        try:
            _PROC_CLEAR_REFS.write_text("5")
            self.start_mb = _status_mb("VmHWM")
        except OSError as error:
            if self.method == "vmhwm":
                raise
            logger.debug("cannot reset VmHWM (%s); sampling RSS instead", error)
            return False
        return True

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _current_rss_mb())

    def __enter__(self) -> PeakRss:
        if self.method in ("auto", "vmhwm") and self._try_reset_hwm():
            self.method = "vmhwm"
        elif _PROC_STATM.exists():
            self.method = "sampling"
            self.start_mb = self.peak_mb = _current_rss_mb()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, name="peak-rss-sampler", daemon=True)
            self._sampler.start()
        else:
            self.method = "ru_maxrss"
            self.start_mb = _lifetime_peak_mb()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.method == "vmhwm":
            self.peak_mb = _status_mb("VmHWM")
        elif self.method == "sampling":
            self._stop.set()
            self._sampler.join()
            self.peak_mb = max(self.peak_mb, _current_rss_mb())
        else:
            self.peak_mb = _lifetime_peak_mb()


def measure_latency(fn: Callable, inputs: Sequence, warmup: int = 3, repeats: int = 20) -> tuple[float, float]:
    """(p50, p95) milliseconds of ``fn(x)`` for single inputs (batch 1), cycling through ``inputs``."""
    if len(inputs) == 0 or repeats < 1:
        raise ValueError("measure_latency needs at least one input and one repeat")
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times_ms = np.empty(repeats)
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(x)
        times_ms[i] = (time.perf_counter() - start) * 1000
    p50, p95 = np.percentile(times_ms, [50, 95])
    return float(p50), float(p95)


def measure_throughput(fn: Callable, batch: Sequence, repeats: int = 3, warmup: int = 1) -> float:
    """Images per second of ``fn(batch)``: ``len(batch)`` over the median time of ``repeats`` calls."""
    if len(batch) == 0 or repeats < 1:
        raise ValueError("measure_throughput needs a non-empty batch and at least one repeat")
    for _ in range(warmup):
        fn(batch)
    seconds = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn(batch)
        seconds[i] = time.perf_counter() - start
    return float(len(batch) / max(float(np.median(seconds)), 1e-9))


def directory_size_mb(path: str | Path) -> float:
    """Total size of the files under ``path`` (or of the file itself) in MB; symlinks are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / _MB
    if not path.is_dir():
        raise FileNotFoundError(f"no file or directory at {path}")
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total / _MB
