"""GANomaly's scoring graph: the generator's reconstruction, the residual map and the image score."""

from __future__ import annotations

from torch import nn

from automl_ad.detectors.blocks import MapHead, blur


class GanomalyGraph(nn.Module):
    """Images in [0, 1] -> (image scores, maps): images mapped to [-1, 1], the generator's reconstruction; map =
    smoothed mean absolute residual / 2, image score = the latent distance or the map's maximum."""

    def __init__(self, generator: nn.Module, size: int, sigma: float, latent_score: bool):
        super().__init__()
        self.generator, self.latent_score = generator, latent_score
        self.blur, self.head = blur(sigma, size), MapHead()

    def forward(self, images):
        inputs = images * 2 - 1
        fake, latent_in, latent_out = self.generator(inputs)
        maps = self.blur((inputs - fake).abs().mean(dim=1, keepdim=True) / 2)[:, 0]
        if self.latent_score:
            return (latent_in - latent_out).pow(2).flatten(1).mean(dim=1), maps
        return self.head(maps)
