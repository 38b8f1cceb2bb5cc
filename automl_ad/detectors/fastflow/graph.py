"""FastFlow's scoring head: per-stage flows, 1 - mean over stages of the upsampled likelihood exp(-0.5 mean_c z^2),
optionally smoothed; image score = the map's maximum."""

from __future__ import annotations

import torch
from torch import nn

from automl_ad.detectors.blocks import MapHead, UpsampleSmooth, upsample


def flow_outputs(model: nn.Module, features) -> list:
    """[(z, log|det J|)] per stage for per-stage feature batches (each stage: its LayerNorm, then its flow)."""
    return [flow(norm(feature)) for feature, norm, flow in zip(features, model["norms"], model["flows"])]


class FastFlowHead(nn.Module):
    """Feature maps -> (image scores, maps) through the trained ``model`` (LayerNorms and flows)."""

    def __init__(self, model: nn.Module, size: int, sigma: float):
        super().__init__()
        self.model, self.size = model, int(size)
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, *features):
        stages = flow_outputs(self.model, features)
        likelihood = sum(upsample(torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)), self.size)
                         for z, _ in stages)
        return self.head(self.smooth(1 - likelihood[:, 0] / len(stages)))
