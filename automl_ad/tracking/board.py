"""Leaderboards of searches read back from the MLflow store."""

from __future__ import annotations

from pathlib import Path

from automl_ad.tracking.store import Tracker


def leaderboard(target: str | None, tracking_uri: str | None = None, pareto: bool = False) -> list[dict]:
    """Trials of the newest search of ``target`` (a dataset folder or an experiment name; None = the newest
    search in the store), best quality first; ``pareto`` keeps the front only."""
    tracker = Tracker(tracking_uri)
    if target is None:
        runs = tracker.client.search_runs([e.experiment_id for e in tracker.client.search_experiments()],
                                          filter_string="tags.`automl_ad.kind` = 'search'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            from automl_ad.errors import UsageError

            raise UsageError(f"no search in {tracker.uri}; run `automl-ad search` first")
        parent = runs[0].info.run_id
    elif Path(target).is_dir():
        from automl_ad.data import open_dataset
        from automl_ad.search.engine import experiment_name

        parent = tracker.latest_search(experiment_name(open_dataset(target)))
    else:
        parent = tracker.latest_search(target)
    rows = []
    for run in tracker.trials(parent):
        row = {"run_id": run.info.run_id, **run.data.tags, **run.data.metrics}
        row["pareto_rank"] = int(row["pareto_rank"]) if "pareto_rank" in row else None
        row = {k: v for k, v in row.items() if not k.startswith("mlflow.")}
        if not pareto or row["pareto_rank"] == 0:
            rows.append(row)
    return sorted(rows, key=lambda r: (r.get("status") != "ok", -(r.get("quality") or 0)))
