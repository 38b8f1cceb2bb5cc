"""Log a model package as an MLflow pyfunc model, so `mlflow models serve` answers /invocations with scores."""

from __future__ import annotations

from pathlib import Path


def log_package(package_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None,
                name: str = "anomaly_model") -> str:
    """Log ``package_dir`` (verified on load) as a pyfunc model; returns its ``models:/`` URI.

    Logged to run ``run_id`` (e.g. the trial the package came from) or a new run in experiment "automl-ad/served".
    Serve with ``mlflow models serve -m <uri> --env-manager local`` in an environment that has automl-ad.
    """
    import mlflow

    from automl_ad.deploy.package import load_package
    from automl_ad.tracking.store import Tracker

    load_package(package_dir)  # refuse to log a damaged package
    tracker = Tracker(tracking_uri)
    if run_id is None:
        run_id = tracker.client.create_run(tracker.experiment("automl-ad/served")).info.run_id
    code = Path(__file__).with_name("pyfunc_model.py")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=name, python_model=str(code),
                                       artifacts={"package": str(Path(package_dir).resolve())},
                                       pip_requirements=["automl-ad"])
    return info.model_uri
