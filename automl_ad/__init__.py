"""automl-ad: pick and tune the right industrial image anomaly-detection method for your data."""

from automl_ad.version import __version__

__all__ = ["__version__", "load_package"]


def load_package(path):
    """Load and verify a model package written by ``automl-ad export`` (see :mod:`automl_ad.deploy.package`)."""
    from automl_ad.deploy.package import load_package as _load

    return _load(path)
