"""The autoencoder's scoring graph: the reconstruction-error map, smoothed, and its reduction to the image
score."""

from __future__ import annotations

from torch import nn

from automl_ad.detectors.blocks import MapHead, blur, ssim_map, ssim_window


class AutoencoderGraph(nn.Module):
    """Images -> (image scores, maps): squared error summed over channels (``l2``) or 1 - SSIM averaged over
    channels (``ssim``), Gaussian-smoothed, reduced by ``head``."""

    def __init__(self, model: nn.Module, metric: str, size: int, sigma: float, head: MapHead):
        super().__init__()
        self.model, self.metric = model, metric
        channels = next(self.model.parameters()).shape[1]  # the first convolution's input channels
        self.register_buffer("window", ssim_window(channels).float().contiguous() if metric == "ssim" else None)
        self.blur, self.head = blur(sigma, size), head

    def forward(self, images):
        reconstruction = self.model(images)
        if self.metric == "l2":
            maps = (images - reconstruction).pow(2).sum(dim=1, keepdim=True)
        else:
            maps = (1 - ssim_map(reconstruction, images, window=self.window)).mean(dim=1, keepdim=True)
        return self.head(self.blur(maps)[:, 0])
