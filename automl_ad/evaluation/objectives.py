"""The search's objectives and Pareto ranking, defined once for the search, the tracking store and reports."""

from __future__ import annotations

import numpy as np

from automl_ad.defaults import PARETO_TIE_SHARE

#: Objectives of the search: (metric name, direction).
OBJECTIVES = (("quality", "max"), ("throughput", "max"), ("memory_mb", "min"))
OBJECTIVE_METRICS = [name for name, _ in OBJECTIVES]
OBJECTIVE_MODES = [mode for _, mode in OBJECTIVES]
#: Per objective, the share within which two values are ties for Pareto ranking.
OBJECTIVE_TIES = [0.0, PARETO_TIE_SHARE, PARETO_TIE_SHARE]


def pareto_ranks(values: np.ndarray, directions: list[str] = OBJECTIVE_MODES,
                 ties: list[float] = OBJECTIVE_TIES) -> np.ndarray:
    """Non-dominated sorting: rank 0 = the Pareto front, rank 1 = the front once rank 0 is removed, ...

    ``ties``: per objective, the share of a value within which another counts as equal (quality: exact). Such
    near-ties can dominate in a circle; the trials left in one then share a rank."""
    values = np.asarray(values, float)
    signed = values * np.array([1.0 if d == "max" else -1.0 for d in directions])
    n = len(signed)
    if n == 0:
        return np.zeros(0, int)
    slack = np.abs(values) * np.asarray(ties, float)[: values.shape[1]]  # (n, objectives), about trial i
    # dominated_by[i, j]: j is at least as good as i everywhere (within i's tie) and better somewhere (beyond it)
    dominated_by = ((signed[None, :, :] >= signed[:, None, :] - slack[:, None, :]).all(-1)
                    & (signed[None, :, :] > signed[:, None, :] + slack[:, None, :]).any(-1))
    ranks = np.full(n, -1)
    remaining = np.ones(n, bool)
    rank = 0
    while remaining.any():
        current = remaining & ~(dominated_by & remaining[None, :]).any(axis=1)
        if not current.any():  # a circle of near-ties
            current = remaining.copy()
        ranks[current] = rank
        remaining &= ~current
        rank += 1
    return ranks
