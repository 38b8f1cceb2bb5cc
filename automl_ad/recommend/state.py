"""What `recommend` leaves in the working directory (``.automl-ad/state.json`` plus a profile and recommendation
per category) and how a later `search` finds it: the recommend state, written and read here only."""

from __future__ import annotations

import json
from pathlib import Path

from automl_ad.data.layout import category_root
from automl_ad.errors import UsageError
from automl_ad.folders import write_json_atomically
from automl_ad.workspace import state_dir

STATE_FILE = "state.json"
SCREEN_FILE = "screen.json"  # the screen of the good images, beside a category's recommendation


def category_dir(profile) -> Path:
    """Where a category's profile, recommendation and screen are kept."""
    return state_dir() / f"{profile.name}-{profile.fingerprint}"


def save_state(results: list[tuple], constraints_source: str | None, data: str | Path) -> Path:
    """Keep each category's (profile, recommendation) so that `search` without DATA can pick them up."""
    entries = []
    for profile, recommendation in results:
        profile_file = profile.save(category_dir(profile) / "profile.json")
        rec_file = recommendation.save(profile_file.parent / "recommendation.json")
        entries.append({"dataset": profile.root, "category": profile.name, "fingerprint": profile.fingerprint,
                        "profile": str(profile_file), "recommendation": str(rec_file),
                        "shortlist": recommendation.shortlist})
    state = {"data": str(Path(data).resolve()), "constraints": constraints_source, "categories": entries}
    state_file = state_dir() / STATE_FILE
    write_json_atomically(state_file, state)
    return state_file


def load_state() -> dict | None:
    """The state the last `recommend` left here, or None."""
    path = state_dir() / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def entry_for(state: dict | None, data: str | None, category: str | None) -> dict | None:
    """The state's entry for this dataset (or the only/named one when no data is given)."""
    if not state:
        return None
    entries = state.get("categories", [])
    if data is not None:
        root = category_root(data, category).resolve()
        entries = [e for e in entries if Path(e["dataset"]).resolve() == root or
                   (Path(e["dataset"]).parent.resolve() == root and len(entries) == 1)]
    if category:
        entries = [e for e in entries if e["category"] == category]
    if len(entries) > 1:
        names = ", ".join(e["category"] for e in entries)
        raise UsageError(f"the last recommendation covers several categories ({names}); search one at a time with "
                         "--category NAME")
    return entries[0] if entries else None


def read_recommendation(entry: dict) -> dict:
    """The recommendation an entry points to."""
    return json.loads(Path(entry["recommendation"]).read_text())
