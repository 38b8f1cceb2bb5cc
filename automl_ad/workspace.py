"""Where automl-ad keeps its working state for a dataset, in one place: the state folder of the working
directory, a search's working folder, and the MLflow experiment a dataset's searches are recorded under."""

from __future__ import annotations

from pathlib import Path

from automl_ad.data import open_dataset
from automl_ad.defaults import STATE_DIR


def state_dir() -> Path:
    """``.automl-ad/`` of the working directory (recommend state, default tracking store, search folders)."""
    return Path.cwd() / STATE_DIR


def work_dir_for(dataset) -> Path:
    """The working folder of searches on ``dataset`` (split, synthetic validation images, trial models)."""
    return state_dir() / "search" / f"{dataset.name}-{dataset.fingerprint()}"


def experiment_name(dataset) -> str:
    """The MLflow experiment that holds every search of ``dataset`` (name and content fingerprint)."""
    return f"automl-ad/{dataset.name}-{dataset.fingerprint()[:8]}"


def dataset_experiment(folder: str | Path) -> str:
    """The experiment of the dataset in ``folder`` (opened and fingerprinted)."""
    return experiment_name(open_dataset(folder))
