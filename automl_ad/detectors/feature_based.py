"""Shared pieces for families built on pretrained backbone features (PatchCore, PaDiM, FastFlow, STPM...).

Subclasses list the backbone parameters in their own ``__init__`` (scikit-learn reads parameters from the
signature): ``backbone``, ``feature_strides``, ``weights``, ``pretrained``, ``input_size``, ``device``,
``cache_features``; their constraints are :data:`BACKBONE_CONSTRAINTS`.
"""

from __future__ import annotations

import os

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector
from automl_ad.detectors.parameters import POSITIVE_INT, PowerOfTwo, TupleOf
from automl_ad.errors import AutomlAdError
from automl_ad.features import FeatureCache, extract_features, load_extractor

_CACHE: FeatureCache | None = None


def feature_cache() -> FeatureCache:
    """The process-wide feature cache (location from ``$AUTOML_AD_CACHE_DIR``)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = FeatureCache()
    return _CACHE


#: Constraints of the backbone parameters (which strides a backbone offers is checked when it is loaded).
BACKBONE_CONSTRAINTS = {
    "backbone": [str], "feature_strides": [TupleOf(PowerOfTwo(2))], "weights": [None, str, os.PathLike],
    "pretrained": [bool], "input_size": [POSITIVE_INT], "device": [str], "cache_features": [bool],
}


class BackboneDetector(Detector):
    """A detector reading feature maps of a timm backbone at ``feature_strides``."""

    def _extractor(self):
        return load_extractor(self.backbone, self.feature_strides, self.input_size, weights=self.weights,
                              pretrained=self.pretrained, device=self.device)

    def _features(self, images: ImageSet) -> list[np.ndarray]:
        """Feature maps (one float32 array (N, C, h, w) per stride). Image files go through the feature cache
        (training and validation sets are scored again and again in a search); in-memory images never do."""
        extractor = self._extractor()
        if self.cache_features and images.paths is not None:
            return extract_features(extractor, images, feature_cache())
        return extractor.features_of(images)

    def _backbone_state(self) -> dict:
        """What identifies the backbone weights, saved with the model and checked on load."""
        return {"weights_identity": self._extractor().spec.weights.identity}

    def _check_backbone(self, state: dict) -> None:
        identity = self._extractor().spec.weights.identity
        if state.get("weights_identity") not in (None, identity):
            raise AutomlAdError(f"{self.name}: the model was fitted with backbone weights {state['weights_identity']}"
                                f" but {identity} are loaded now; pass the same weights file")

