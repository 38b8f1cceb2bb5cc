"""The statistical route's filter bank and scoring graph on luma images (N, 1, S, S)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from automl_ad.detectors.blocks import GaussianBlur, MapHead, blur

#: (derivative order per axis, power of sigma) of each filter after the local mean and standard deviation:
#: sigma*Ix, sigma*Iy, sigma^2*Ixx, sigma^2*Iyy, sigma^2*Ixy (the scale-normalised local jet).
DERIVATIVES = (((0, 1), 1), ((1, 0), 1), ((0, 2), 2), ((2, 0), 2), ((1, 1), 2))
FEATURES_PER_SCALE = 2 + len(DERIVATIVES)


class LocalFeatures(nn.Module):
    """Luma images (N, 1, S, S) -> local features (N, S, S, 7 x len(scales)): per scale the local mean, the local
    standard deviation and the scale-normalised Gaussian derivatives (scipy's ``gaussian_filter``, 'reflect')."""

    def __init__(self, scales, size: int):
        super().__init__()
        shape = (int(size), int(size))
        self.scales = [float(s) for s in scales]
        self.means = nn.ModuleList(GaussianBlur(s, shape) for s in self.scales)
        self.derivatives = nn.ModuleList(GaussianBlur(s, shape, order) for s in self.scales
                                         for order, _ in DERIVATIVES)

    def forward(self, images):
        channels = []
        for index, (sigma, mean_filter) in enumerate(zip(self.scales, self.means)):
            mean = mean_filter(images)
            channels += [mean, (mean_filter(images * images) - mean * mean).clamp(min=0).sqrt()]
            filters = self.derivatives[index * len(DERIVATIVES):(index + 1) * len(DERIVATIVES)]
            channels += [sigma ** power * derivative(images) for derivative, (_, power) in zip(filters, DERIVATIVES)]
        return torch.cat(channels, dim=1).permute(0, 2, 3, 1)


class GaussianGraph(nn.Module):
    """Images -> (image scores, maps): the Mahalanobis distance of each pixel's local features to the normal model
    (one Gaussian per position or one shared), smoothed; image score = the map's maximum."""

    def __init__(self, features: LocalFeatures, location: np.ndarray, precision: np.ndarray, per_position: bool,
                 size: int, sigma: float):
        super().__init__()
        self.features, self.per_position = features, per_position
        self.register_buffer("location", torch.from_numpy(np.ascontiguousarray(location, dtype=np.float32)))
        self.register_buffer("precision", torch.from_numpy(np.ascontiguousarray(precision, dtype=np.float32)))
        self.blur, self.head = blur(sigma, size), MapHead()

    def forward(self, images):
        centred = self.features(images) - self.location  # (N, H, W, D)
        if self.per_position:
            projected = (centred[..., None, :] @ self.precision)[..., 0, :]
        else:
            projected = centred @ self.precision
        distance = (projected * centred).sum(dim=-1).clamp(min=0).sqrt()[:, None]
        return self.head(self.blur(distance)[:, 0])
