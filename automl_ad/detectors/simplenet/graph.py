"""SimpleNet's patch score, the network part of its scoring graph (a :class:`~automl_ad.detectors.blocks.
PatchScoreHead` on the locally aware patch features)."""

from __future__ import annotations

from torch import nn


class NegatedDiscriminator(nn.Module):
    """(P, D) patch features -> (P,) scores -D(adaptor(x)) (higher = more anomalous)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, patches):
        return -self.model["discriminator"](self.model["adaptor"](patches))[:, 0]
