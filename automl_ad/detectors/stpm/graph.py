"""STPM's scoring head: the student on the normalised images beside the teacher's feature maps, per-stage
normalised feature distances upsampled and combined (product or sum), optionally smoothed; image score = the
map's maximum."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from automl_ad.detectors.blocks import MapHead, Normalise, UpsampleSmooth, upsample


def feature_distances(teacher, student):
    """Per-position 0.5 * squared distance of channel-L2-normalised features: (N, C, h, w) pairs -> (N, h, w)."""
    return 0.5 * (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(dim=1)


class STPMHead(nn.Module):
    """(images, *teacher feature maps) -> (image scores, maps)."""

    def __init__(self, normalise: Normalise, student: nn.Module, size: int, combination: str, sigma: float):
        super().__init__()
        self.normalise, self.student, self.size = normalise, student, int(size)
        self.product = combination == "product"
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, images, *teacher):
        combined = None
        for t, s in zip(teacher, self.student(self.normalise(images))):
            level = upsample(feature_distances(t, s)[:, None], self.size)
            combined = level if combined is None else combined * level if self.product else combined + level
        return self.head(self.smooth(combined[:, 0]))
