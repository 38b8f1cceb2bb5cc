"""Leaderboards of searches read back from the tracking store."""

from __future__ import annotations

from automl_ad.defaults import SEARCH_BEST_QUALITY_METRIC
from automl_ad.tracking.records import SearchStore


def leaderboard(target: str | None, tracking_uri: str | None = None, pareto: bool = False) -> list[dict]:
    """Trials of the newest search of ``target`` (a dataset folder, an experiment name, a search or trial run id;
    None = the newest search in the store) as rows, best quality first; ``pareto`` keeps the front only."""
    store = SearchStore(tracking_uri)
    search = store.resolve(target)
    trials = store.front(search.run_id) if pareto else store.trials(search.run_id)
    return [t.row() for t in trials]


def best_so_far(target: str | None, tracking_uri: str | None = None) -> list[tuple[float, float]]:
    """The anytime curve of the search meant by ``target`` (as for :func:`leaderboard`): (seconds into the search,
    best validation quality of a complete trial by then), oldest first."""
    store = SearchStore(tracking_uri)
    search = store.resolve(target)
    history = store.tracker.client.get_metric_history(search.run_id, SEARCH_BEST_QUALITY_METRIC)
    return sorted((float(m.step), float(m.value)) for m in history)
