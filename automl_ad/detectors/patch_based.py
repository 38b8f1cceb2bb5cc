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
#: Bytes at a fit's peak per value of the training patches' embeddings (float32), for the families that fit on all
#: of them at once: the embedding, the features and the pooling it is computed from (and PatchCore's coreset
#: projection). Measured with MobileNetV2 (128 channels) as the extra peak per value from fewer to more images:
#: PatchCore 10 (ball_screw's 480x512 tiles, 1.15 -> 2.30 million patches), Deep SVDD 11.3 and 11.4 (512 px
#: inputs, 32 -> 128 images; 480x512 tiles, 40 -> 160 images); SimpleNet's fits stay below it.
PATCH_PEAK_BYTES = 12


class PatchFeatureDetector(BackboneGraphDetector):
    """A backbone family reading locally aware patch features (parameters ``neighbourhood``, ``embedding_dim``)."""

    def _embedding(self) -> PatchEmbedding:
        return PatchEmbedding(sum(self._extractor().channels), self.neighbourhood, self.embedding_dim)

    @classmethod
    def _training_patches(cls, train_images: int, network_pixels: float, params: dict) -> tuple[float, int]:
        """(patches, values per patch) of the training set's embeddings: one patch per cell of the finest stride,
        of ``embedding_dim`` values or the backbone's channels at the strides (0 when those are unknown)."""
        strides, channels = cls._channels_of(params)
        return train_images * network_pixels / min(strides) ** 2, \
            params.get("embedding_dim", cls().embedding_dim) or channels or 0

    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """``PATCH_PEAK_BYTES`` per value of the training patches' embeddings, which the fit holds all at once."""
        patches, dim = cls._training_patches(train_images, network_pixels, params)
        return patches * dim * PATCH_PEAK_BYTES

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
