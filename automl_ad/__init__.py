"""automl-ad: pick and tune the right industrial image anomaly-detection method for your data."""

import os

from automl_ad.defaults import OPENMP_SPIN_COUNT
from automl_ad.version import __version__

# Before torch loads libgomp, which reads it once (see OPENMP_SPIN_COUNT); a value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))

__all__ = ["__version__", "load_package"]


def load_package(path):
    """Load and verify a model package written by ``automl-ad export`` (see :mod:`automl_ad.deploy.package`)."""
    from automl_ad.deploy.package import load_package as _load

    return _load(path)
