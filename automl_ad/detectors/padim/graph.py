"""PaDiM's scoring head: the selected channels on the finest grid, Mahalanobis distance to each position's
Gaussian, the smoothed map and its maximum."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_ad.detectors.blocks import MapHead, UpsampleSmooth


class PadimEmbedding(nn.Module):
    """Feature maps -> embeddings (N, h*w, D): every map brought to the finest ``grid`` by nearest-neighbour
    upsampling (each coarse cell covers its fine cells), concatenated, and the chosen ``channels`` kept."""

    def __init__(self, channels: np.ndarray, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.register_buffer("channels", torch.from_numpy(np.asarray(channels, dtype=np.int64)))

    def forward(self, *features):
        maps = [f if tuple(f.shape[-2:]) == self.grid else F.interpolate(f, size=self.grid, mode="nearest")
                for f in features]
        return torch.cat(maps, dim=1).index_select(1, self.channels).flatten(2).transpose(1, 2)


class PadimHead(nn.Module):
    """Feature maps -> (image scores, maps): Mahalanobis distances with the stored means and inverse covariances
    (constants), upsampled and smoothed; image score = the map's maximum."""

    def __init__(self, embed: PadimEmbedding, mean: np.ndarray, inv_covariance: np.ndarray, size: int,
                 sigma: float):
        super().__init__()
        self.embed = embed
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
        self.register_buffer("inv_covariance", torch.from_numpy(np.ascontiguousarray(inv_covariance,
                                                                                      dtype=np.float32)))
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, *features):
        delta = (self.embed(*features) - self.mean).transpose(0, 1)  # (P, N, D)
        squared = ((delta @ self.inv_covariance) * delta).sum(dim=2)  # (P, N): one batched product per position
        distances = squared.clamp(min=0).sqrt().transpose(0, 1).reshape(-1, *self.embed.grid)
        return self.head(self.smooth(distances))
