"""How well ranking trials on synthetic anomalies agrees with ranking them on real defects.

A search without labelled defects ranks its trials on synthetic anomalies. When real defects exist (a benchmark,
or a search run with ``--validation synthetic`` on labelled data), every trial is also scored on the real
validation defects, and two numbers say what the synthetic ranking costs:

* ``spearman``: Spearman's rank correlation between the trials' synthetic and real validation quality (ties get
  their average rank, scipy's ``spearmanr``). None with fewer than three trials, or when either ranking is
  constant (the correlation is undefined).
* ``regret``: the real validation quality of the best trial on the real defects minus that of the trial the
  synthetic ranking chooses (its best synthetic quality); 0 when both choose the same, never negative. When
  several trials tie for the best synthetic quality, the regret is averaged over them (choosing among them is a
  coin toss). Test scores are not computed per trial during a search (only the exported model is scored on the
  test split), so the regret is measured on the real validation defects, in the search's quality metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

#: Fewest trials a rank correlation is stated for.
MIN_TRIALS_FOR_SPEARMAN = 3


@dataclass(frozen=True)
class SelectionAgreement:
    """Agreement of the synthetic and the real ranking over ``n_trials`` trials (see the module docstring)."""

    n_trials: int
    spearman: float | None
    regret: float | None


def selection_agreement(synthetic: Sequence[float], real: Sequence[float]) -> SelectionAgreement:
    """Spearman correlation and regret of choosing by ``synthetic`` quality, for trials whose real quality is
    ``real`` (the same trials in the same order; finite numbers)."""
    synthetic, real = np.asarray(synthetic, dtype=np.float64), np.asarray(real, dtype=np.float64)
    if synthetic.ndim != 1 or synthetic.shape != real.shape:
        raise ValueError(f"need one synthetic and one real quality per trial, got shapes {synthetic.shape} and "
                         f"{real.shape}")
    if not (np.isfinite(synthetic).all() and np.isfinite(real).all()):
        raise ValueError("qualities must be finite numbers")
    n = len(synthetic)
    if n == 0:
        return SelectionAgreement(0, None, None)
    chosen = synthetic == synthetic.max()
    regret = float(real.max() - real[chosen].mean())
    rho = None
    if n >= MIN_TRIALS_FOR_SPEARMAN and np.ptp(synthetic) > 0 and np.ptp(real) > 0:
        rho = float(spearmanr(synthetic, real).statistic)
    return SelectionAgreement(n, rho, regret)
