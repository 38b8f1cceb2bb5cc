"""Detector families behind one contract (see base.py) and a registry (see registry.py)."""

from automl_ad.detectors.base import Detector, NotApplicableError, NotFittedError, Scores
from automl_ad.detectors.registry import create_detector, detector_class, list_detectors, register_detector

__all__ = ["Detector", "NotApplicableError", "NotFittedError", "Scores", "create_detector", "detector_class",
           "list_detectors", "register_detector"]
