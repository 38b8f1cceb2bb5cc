"""Registry of detector families: ``create_detector(name, **params)``, ``list_detectors()``.

Family modules are imported only when a family is asked for, so listing names or building a traditional
detector does not import torch.
"""

from __future__ import annotations

import difflib
import importlib
import os

from automl_ad.errors import UsageError

#: Family name → module that defines (and registers) it.
FAMILY_MODULES = {
    "patchcore": "automl_ad.detectors.patchcore.detector",
    "padim": "automl_ad.detectors.padim.detector",
    "fastflow": "automl_ad.detectors.fastflow.detector",
    "stpm": "automl_ad.detectors.stpm.detector",
    "gaussian": "automl_ad.detectors.gaussian.detector",
    "frequency": "automl_ad.detectors.frequency.detector",
    "template": "automl_ad.detectors.template.detector",
    "rpca": "automl_ad.detectors.rpca.detector",
    "sparse_coding": "automl_ad.detectors.sparse_coding.detector",
    "ocsvm": "automl_ad.detectors.ocsvm.detector",
    "autoencoder": "automl_ad.detectors.autoencoder.detector",
    "ganomaly": "automl_ad.detectors.ganomaly.detector",
    "diffusion": "automl_ad.detectors.diffusion.detector",
    "deep_svdd": "automl_ad.detectors.deep_svdd.detector",
    "cutpaste": "automl_ad.detectors.cutpaste.detector",
    "simplenet": "automl_ad.detectors.simplenet.detector",
}

_REGISTRY: dict[str, type] = {}


class UnknownDetectorError(UsageError, KeyError):
    """No family of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_detector(cls):
    """Class decorator: make a family available under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_detectors() -> list[str]:
    """Names of every available family, sorted."""
    return sorted(FAMILY_MODULES)


def detector_class(name: str) -> type:
    """The class of family ``name`` (imports its module on first use)."""
    if name not in FAMILY_MODULES:
        close = difflib.get_close_matches(name, FAMILY_MODULES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownDetectorError(f"no detector family '{name}'.{hint} Available: {', '.join(list_detectors())}")
    if name not in _REGISTRY:
        importlib.import_module(FAMILY_MODULES[name])
    return _REGISTRY[name]


def create_detector(name: str, **params):
    """Construct family ``name`` with ``params``. Unknown parameters raise with the accepted ones listed, a
    ``backbone`` that names no timm model with the usual ones, and a ``weights`` file that is none (or another
    backbone's) with what is wrong with it."""
    cls = detector_class(name)
    accepted = cls._get_param_names()
    unknown = [k for k in params if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UsageError(f"{name} has no parameter {', '.join(hints)}. Accepted: {', '.join(accepted)}")
    # An unknown backbone or an unusable weights file is said now, not as a loader's failure at fit time.
    if isinstance(params.get("backbone"), str):
        from automl_ad.features.backbone import check_backbone_name

        check_backbone_name(params["backbone"], family=name)
    detector = cls(**params)
    if isinstance(params.get("weights"), (str, os.PathLike)):
        from automl_ad.features.backbone import check_weights_file

        backbone = getattr(detector, "backbone", None)
        check_weights_file(params["weights"], backbone if isinstance(backbone, str) else None)
    return detector
