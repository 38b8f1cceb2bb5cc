"""Backbone features: timm feature pyramids with local or hub weights, and the cross-trial feature cache."""

from automl_ad.features.backbone import (
    BackboneWeightsError,
    FeatureExtractor,
    load_extractor,
    resolve_device,
)
from automl_ad.features.cache import FeatureCache, extract_features

__all__ = ["BackboneWeightsError", "FeatureCache", "FeatureExtractor", "extract_features", "load_extractor",
           "resolve_device"]
