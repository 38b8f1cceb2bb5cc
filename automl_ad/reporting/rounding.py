"""Figures shown to people: qualities and rates to three decimals (0.978, not 0.9775691184141888), times in the
unit that reads at a glance. Stored metrics keep full precision; only what is printed or rendered is rounded."""

from __future__ import annotations

import math

#: Decimals of qualities (AUROC, AUPRO, ...) and rates (false-alarm, detection) shown to people.
QUALITY_DECIMALS = 3


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def rounded(value, decimals: int = QUALITY_DECIMALS) -> str:
    """``value`` with ``decimals`` decimals; "n/a" when it is missing."""
    return "n/a" if _missing(value) else f"{float(value):.{decimals}f}"


def duration(seconds) -> str:
    """A time span: "420 ms", "12.3 s", "4 min 05 s", "2 h 07 min"; "n/a" when it is missing."""
    if _missing(seconds):
        return "n/a"
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"
