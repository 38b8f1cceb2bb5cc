"""Deep SVDD's patch score, the network part of its scoring graph (a :class:`~automl_ad.detectors.blocks.
PatchScoreHead` on the locally aware patch features)."""

from __future__ import annotations

from torch import nn


class SvddDistance(nn.Module):
    """(P, D) patch features -> (P,) scores ||phi(x) - c||^2 - ``offset`` (R^2 for the soft-boundary objective)."""

    def __init__(self, network: nn.Module, centre, offset: float):
        super().__init__()
        self.network, self.offset = network, float(offset)
        self.register_buffer("centre", centre.detach().float())

    def forward(self, patches):
        return (self.network(patches) - self.centre).pow(2).sum(dim=1) - self.offset
