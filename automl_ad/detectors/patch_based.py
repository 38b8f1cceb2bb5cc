"""Families on PatchCore's locally aware patch features (PatchCore, Deep SVDD, SimpleNet): the embedding, and the
families that score each patch with a trained network (:class:`PatchScoreDetector`)."""

from __future__ import annotations

import torch
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.blocks import PatchEmbedding, PatchScoreHead
from automl_ad.detectors.graph_based import BackboneGraphDetector
from automl_ad.detectors.parameters import POSITIVE_INT

#: Constraints of the patch-feature parameters ``neighbourhood`` and ``embedding_dim``.
PATCH_CONSTRAINTS = {"neighbourhood": [POSITIVE_INT], "embedding_dim": [None, POSITIVE_INT]}
_PATCH_CHUNK = 1 << 16  # patches per forward pass of a patch-scoring network outside the graph


class PatchFeatureDetector(BackboneGraphDetector):
    """A backbone family reading locally aware patch features (parameters ``neighbourhood``, ``embedding_dim``)."""

    def _embedding(self) -> PatchEmbedding:
        return PatchEmbedding(sum(self._extractor().channels), self.neighbourhood, self.embedding_dim)

    def _patch_grids(self, images: ImageSet):
        """Patch features (N, h * w, D) on the backbone's device and the grid (h, w)."""
        embedding = self._embedding().of(self._features(images))
        n, h, w, d = embedding.shape
        return embedding.reshape(n, h * w, d).to(self._extractor().device), (h, w)


class PatchScoreDetector(PatchFeatureDetector):
    """A patch-feature family scoring each patch with a trained network (:meth:`_patch_score`); the map is the
    patch scores upsampled and smoothed (``smoothing_sigma``), the image score its maximum."""

    def _patch_score(self) -> nn.Module:
        """The fitted network part: (P, D) patch features -> (P,) scores, higher = more anomalous."""
        raise NotImplementedError

    def _scoring_graph(self) -> PatchScoreHead:
        return PatchScoreHead(self._embedding(), self._patch_score(), self.input_size, self.smoothing_sigma)

    def patch_scores(self, patches) -> torch.Tensor:
        """Scores (P,) of (P, D) patch features with the fitted network."""
        return run_on_patches(self._patch_score(), patches)


def run_on_patches(module: nn.Module, patches) -> torch.Tensor:
    """``module`` on (P, D) patches in chunks, without gradients."""
    with torch.inference_mode():
        return torch.cat([module(chunk) for chunk in patches.split(_PATCH_CHUNK)])
