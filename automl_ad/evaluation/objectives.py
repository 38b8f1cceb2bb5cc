"""The search's objectives and Pareto ranking, defined once for the search, the tracking store and reports."""

from __future__ import annotations

import numpy as np

#: Objectives of the search: (metric name, direction).
OBJECTIVES = (("quality", "max"), ("throughput", "max"), ("memory_mb", "min"))
OBJECTIVE_METRICS = [name for name, _ in OBJECTIVES]
OBJECTIVE_MODES = [mode for _, mode in OBJECTIVES]


def pareto_ranks(values: np.ndarray, directions: list[str] = OBJECTIVE_MODES) -> np.ndarray:
    """Non-dominated sorting: rank 0 = the Pareto front, rank 1 = the front once rank 0 is removed, ..."""
    signed = np.asarray(values, float) * np.array([1.0 if d == "max" else -1.0 for d in directions])
    n = len(signed)
    if n == 0:
        return np.zeros(0, int)
    # dominated_by[i, j]: j is at least as good as i everywhere and better somewhere
    dominated_by = ((signed[None, :, :] >= signed[:, None, :]).all(-1)
                    & (signed[None, :, :] > signed[:, None, :]).any(-1))
    ranks = np.full(n, -1)
    remaining = np.ones(n, bool)
    rank = 0
    while remaining.any():
        current = remaining & ~(dominated_by & remaining[None, :]).any(axis=1)
        ranks[current] = rank
        remaining &= ~current
        rank += 1
    return ranks
