"""Convolutional autoencoder (the reconstruction route's baseline), following Bergmann et al., "Improving
Unsupervised Defect Segmentation by Applying Structural Similarity to Autoencoders" (VISAPP 2019, AE-SSIM).

1. Images at ``input_size`` (a power of two >= 32), colour or ``gray``, in [0, 1].
2. Network as the paper's table: strided 4x4 convolutions and 3x3 convolutions, LeakyReLU(0.2) after every
   layer but the output, channel widths 32-32-32-64-64-128-64-32 (scaled by ``base_channels`` / 32), down to an
   8x8 grid, then an 8x8 'valid' convolution to a ``latent_dim`` vector (the bottleneck); the decoder mirrors it
   with transposed convolutions and a linear output. The paper's layout is for 128 px; each doubling of
   ``input_size`` adds (each halving removes) one leading 4x4 stride-2 layer of 32 channels, as the paper does
   for 256 px.
3. Training on normal images only: ``loss`` = ``"ssim"`` (1 - mean SSIM, the paper's AE-SSIM), ``"mse"``
   (AE-L2) or ``"mixed"`` (``ssim_weight`` x (1 - SSIM) + (1 - ``ssim_weight``) x MSE); Adam with the paper's
   lr 2e-4 and weight decay 1e-5; ``augment`` adds random horizontal/vertical flips. SSIM is our own
   differentiable implementation (Gaussian window of 11 px and sigma 1.5, Wang et al. 2004 constants), checked
   against scikit-image in the tests. The paper trains far longer, on thousands of augmented patches; a CPU
   budget allows far fewer steps.
4. Anomaly map = per-pixel reconstruction error: ``map_metric`` ``"ssim"`` (1 - SSIM map, mean over channels,
   the paper's choice) or ``"l2"`` (squared error summed over channels), smoothed by a Gaussian of
   ``smoothing_sigma`` pixels (our addition; the paper thresholds the raw residual). Image score = the map's
   maximum or the mean of its ``top_k_fraction`` highest pixels (``image_score``).
"""

from __future__ import annotations

import logging
import math
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.autoencoder.graph import AutoencoderGraph
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.blocks import MapHead, ssim_map
from automl_ad.detectors.generative import (
    epoch_batches,
    image_tensor,
    load_module_tensors,
    module_tensors,
    random_flips,
)
from automl_ad.detectors.graph_based import GraphDetector
from automl_ad.detectors.parameters import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    PowerOfTwo,
)
from automl_ad.detectors.registry import register_detector
from automl_ad.features import resolve_device

log = logging.getLogger(__name__)

LOSSES = ("ssim", "mse", "mixed")
MAP_METRICS = ("ssim", "l2")
IMAGE_SCORES = ("max", "top_k_mean")


@register_detector
class Autoencoder(GraphDetector):
    """Autoencoder route: reconstruct through a bottleneck; the reconstruction error (SSIM or L2) is the map."""

    name = "autoencoder"
    route = "autoencoder"
    iterative = True
    # 32 px, L2: at that size an 11 px SSIM window spans a third of the flange and SSIM ranks worse (AUROC ~0.6)
    test_params = {"input_size": 32, "epochs": 50, "batch_size": 4, "learning_rate": 1e-3, "latent_dim": 32,
                   "base_channels": 16, "loss": "mse", "map_metric": "l2", "smoothing_sigma": 1.0}
    test_category = "object"
    _parameter_constraints = {
        "input_size": [PowerOfTwo(32)], "gray": [bool], "latent_dim": [POSITIVE_INT], "base_channels": [POSITIVE_INT],
        "loss": [Options(*LOSSES)], "ssim_weight": [Interval(Real, 0, 1, closed="both")], "epochs": [POSITIVE_INT],
        "batch_size": [POSITIVE_INT], "learning_rate": [POSITIVE], "weight_decay": [NON_NEGATIVE], "augment": [bool],
        "map_metric": [Options(*MAP_METRICS)], "smoothing_sigma": [NON_NEGATIVE],
        "image_score": [Options(*IMAGE_SCORES)], "top_k_fraction": [Interval(Real, 0, 1, closed="right")],
        "device": [str], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, input_size=128, gray=False, latent_dim=100, base_channels=32, loss="ssim", ssim_weight=0.5,
                 epochs=200, batch_size=16, learning_rate=2e-4, weight_decay=1e-5, augment=False,
                 map_metric="ssim", smoothing_sigma=2.0, image_score="max", top_k_fraction=0.01, device="auto",
                 seed=0):
        self._store_parameters(locals())

    # --- model ------------------------------------------------------------------------------------------------
    def _build(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_autoencoder(int(self.input_size), 1 if self.gray else 3, int(self.latent_dim),
                                      int(self.base_channels))
        return model.to(resolve_device(self.device))

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        model = self._build().train()
        device = next(model.parameters()).device
        images = image_tensor(train, int(self.input_size), bool(self.gray), device)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        for epoch in range(int(self.epochs)):
            total, seen = 0.0, 0
            for index in self._until_deadline(epoch_batches(len(images), int(self.batch_size), generator)):
                batch = images[index.to(device)]
                if self.augment:
                    batch = random_flips(batch, generator)
                loss = self._loss(model(batch), batch)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
                seen += len(index)
            if self._record_epoch(epoch, total / seen, on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim_state([model], model_=model)):
                break
        self.model_ = model.eval()
        log.info("%s: %d epochs, final loss %.5f", self.name, len(self.loss_history_), self.loss_history_[-1])

    def _loss(self, reconstruction, target):
        if self.loss == "mse":
            return F.mse_loss(reconstruction, target)
        structural = 1 - ssim_map(reconstruction, target).mean()
        if self.loss == "ssim":
            return structural
        return self.ssim_weight * structural + (1 - self.ssim_weight) * F.mse_loss(reconstruction, target)

    # --- score ------------------------------------------------------------------------------------------------
    def reconstruct(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, reconstructions) as float32 NCHW arrays at ``input_size``."""
        self._check_fitted()
        device = next(self.model_.parameters()).device
        inputs = image_tensor(images, int(self.input_size), bool(self.gray), device)
        with torch.inference_mode():
            outputs = [self.model_(inputs[s:s + int(self.batch_size)]) for s in range(0, len(inputs),
                                                                                    int(self.batch_size))]
        return inputs.cpu().numpy(), torch.cat(outputs).cpu().numpy()

    def _scoring_graph(self) -> AutoencoderGraph:
        size = int(self.input_size)
        top_k = None if self.image_score == "max" else max(1, int(round(self.top_k_fraction * size * size)))
        return AutoencoderGraph(self.model_, self.map_metric, size, self.smoothing_sigma, MapHead(top_k))

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        return module_tensors(self.model_), {}

    def _restore(self, tensors, state):
        self.model_ = self._build()
        load_module_tensors(self.model_, tensors)
        self.model_.eval()


def _layers(input_size: int, latent_dim: int, width: float) -> list[tuple[int, int, int]]:
    """The encoder's (out_channels, kernel, stride) per layer: the paper's 128 px table with one leading
    stride-2 layer per doubling of the input size, ending in an 8x8 'valid' convolution to the latent vector."""
    scaled = lambda channels: max(1, round(channels * width))  # noqa: E731
    leading = int(math.log2(input_size)) - 5  # 2 at 128 px as in the paper
    body = [(32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1)]
    return [(scaled(32), 4, 2)] * leading + [(scaled(c), k, s) for c, k, s in body] + [(latent_dim, 8, 1)]


def build_autoencoder(input_size: int, channels: int, latent_dim: int, base_channels: int):
    """The AE-SSIM network as an ``nn.Sequential`` of an ``encoder`` and a ``decoder``."""
    layers = _layers(input_size, latent_dim, base_channels / 32)
    encoder, decoder = [], []
    previous = channels
    for index, (out, kernel, stride) in enumerate(layers):
        last = index == len(layers) - 1
        padding = 0 if last else (kernel - stride) // 2
        encoder.append(nn.Conv2d(previous, out, kernel, stride, padding))
        if not last:
            encoder.append(nn.LeakyReLU(0.2))
        # the mirrored decoder layer maps back to ``previous`` channels; all but the output layer are activated
        decoder.insert(0, nn.ConvTranspose2d(out, previous, kernel, stride, padding))
        if index > 0:
            decoder.insert(1, nn.LeakyReLU(0.2))
        previous = out
    return nn.Sequential(nn.Sequential(*encoder), nn.Sequential(*decoder))

