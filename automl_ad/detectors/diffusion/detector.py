"""Denoising diffusion reconstruction (the diffusion route): a DDPM trained on normal images reconstructs a partly
noised test image; pixel and pretrained-feature differences to the input are the anomaly map, as DDAD
(Mousakhan, Brox and Tayyub, 2023) with DiffusionAD's one-step reconstruction (Zhang et al., 2023) as a setting.

1. Denoiser: a DDPM noise-prediction UNet (Ho et al., 2020) sized down for CPU: ``channels`` wide, one residual
   block per level at ``channel_mults`` (GroupNorm, SiLU, sinusoidal time embedding through a 2-layer MLP added in
   every block), strided-conv downsampling, nearest+conv upsampling, self-attention at the lowest resolution,
   skip connections; images at ``input_size`` scaled to [-1, 1]. ``timesteps`` T with a ``schedule`` of betas:
   DDPM's linear 1e-4..0.02 (rescaled by 1000/T) or the cosine schedule of Nichol and Dhariwal (2021).
2. Training on normal images: t ~ U{0..T-1}, x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, loss = MSE between
   eps and the UNet's prediction; Adam (lr and weight decay as DDAD's config), gradients clipped to norm 1 as
   DDPM, an exponential moving average of the weights (``ema_decay``, warmed up as (1 + n) / (10 + n) so that a
   short run is not dominated by the initial weights) is the model used for testing.
3. Reconstruction: noise the test image to step ``t0`` with a fixed noise draw (from ``seed``, the same for
   every image, so a score does not depend on its batch or on chance) and denoise with ``steps`` deterministic
   DDIM steps (eta = 0) spaced evenly from ``t0`` to 0; x0 predictions are clipped to the image range.
   ``steps=1`` is DiffusionAD's one-step x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). ``guidance`` > 0 is
   DDAD's conditioning on the input y: eps <- eps - sqrt(1 - abar_t) w (y_t - x_t) with
   y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps. DDAD uses stochastic steps (eta = 1); we keep them deterministic.
4. Anomaly map (DDAD): D_p = |x - x_rec| averaged over colour channels; with ``feature_scoring``, also
   D_f = sum over ``feature_strides`` of 1 - cosine similarity between the pretrained backbone's features of x and
   x_rec, each 3x3-average-pooled first (DDAD's patchify), upsampled to the input size; map = D_f +
   ``pixel_weight`` x s x D_p, Gaussian-smoothed by ``smoothing_sigma``; image score = the map's maximum. DDAD sets
   s = max(D_f) / max(D_p) over each test batch, which makes a score depend on the other images; we fix s at fit
   from normal training images (the first ``batch_size``). DDAD also fine-tunes the backbone by distillation
   (domain adaptation); we use it frozen, loaded exactly as the other backbone families. Without pretrained
   weights set ``feature_scoring=False``: the map is then D_p alone.

Cost: training is one UNet forward and backward per image per epoch; scoring is ``steps`` UNet forwards plus two
backbone passes per image. Measured on one (shared) CPU core at 64 px: with 16 channels (0.27 M parameters) an
epoch over MVTec bottle's 209 images took about 13 s, and scoring 200-300 ms per image at 10 steps (35 ms at 1
step); the default 32 channels (1.1 M parameters) cost about 4x as much to train. DDAD trains 1000-3000 epochs at
256 px on a GPU; a few minutes of CPU training is a small fraction of that, so this family is heavily
under-trained on CPU budgets (see reports/families.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback, Scores
from automl_ad.detectors.blocks import smooth_maps
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS, BackboneDetector
from automl_ad.detectors.generative import epoch_batches, load_module_tensors, module_tensors
from automl_ad.detectors.parameters import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    MultipleOf,
    Options,
    TupleOf,
)
from automl_ad.detectors.registry import register_detector
from automl_ad.errors import InvalidParameterError
from automl_ad.features import BackboneWeightsError, resolve_device

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine")
#: DDPM clips gradients to this norm.
GRADIENT_CLIP = 1.0
_GROUPS = 8


@register_detector
class Diffusion(BackboneDetector):
    """Diffusion route: partial-noise DDPM/DDIM reconstruction; pixel + feature differences are the anomaly map."""

    name = "diffusion"
    square_network_input = True
    route = "diffusion"
    no_graph = "scoring draws random noise and runs an iterative denoising loop, so it is not a deterministic graph"
    iterative = True
    # At 32 px the backbone's stride-8/16 maps are 4x4/2x2, too coarse to help: the contract test scores pixels.
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "channels": 8,
                   "channel_mults": (1, 2), "epochs": 150, "batch_size": 8, "learning_rate": 2e-3, "t0": 50,
                   "steps": 1, "feature_scoring": False}
    test_category = "object"
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, "input_size": [Interval(Integral, 8, None, closed="left")],
        "channels": [MultipleOf(_GROUPS)], "channel_mults": [TupleOf(POSITIVE_INT)], "timesteps": [POSITIVE_INT],
        "schedule": [Options(*SCHEDULES)], "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT],
        "learning_rate": [POSITIVE], "weight_decay": [NON_NEGATIVE], "ema_decay": [Interval(Real, 0, 1, closed="both")],
        "t0": [NON_NEGATIVE_INT], "steps": [POSITIVE_INT], "guidance": [NON_NEGATIVE], "feature_scoring": [bool],
        "pixel_weight": [NON_NEGATIVE], "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="wide_resnet50_2", feature_strides=(8, 16), weights=None, pretrained=True,
                 input_size=64, geometry=None, device="auto", cache_features=True, precision="fp32", channels=32,
                 channel_mults=(1, 2, 2), timesteps=1000, schedule="linear", epochs=1000, batch_size=32,
                 learning_rate=1e-3, weight_decay=1e-5, ema_decay=0.999, t0=250, steps=10, guidance=3.0,
                 feature_scoring=True, pixel_weight=1.0, smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- parameters -------------------------------------------------------------------------------------------
    def _check_parameter_relations(self) -> None:
        levels = len(self.channel_mults)
        if self.input_size % 2 ** (levels - 1):
            raise InvalidParameterError(f"{self.name}: input_size {self.input_size} must be divisible by "
                                        f"2^{levels - 1} for {levels} UNet levels (channel_mults)")
        if self.t0 >= self.timesteps:
            raise InvalidParameterError(f"{self.name}: t0 must be below timesteps ({self.timesteps}), got {self.t0}")
        if self.steps > self.t0 + 1:
            raise InvalidParameterError(f"{self.name}: steps ({self.steps}) cannot exceed t0 + 1 ({self.t0 + 1}) "
                                        "distinct timesteps")

    # --- model ------------------------------------------------------------------------------------------------
    def _build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = UNet(3, int(self.channels), tuple(int(m) for m in self.channel_mults))
        return model.to(resolve_device(self.device))

    def _alphas_bar(self) -> torch.Tensor:
        return torch.from_numpy(alphas_bar(self.schedule, int(self.timesteps))).float()

    def _feature_extractor(self):
        try:
            return self._extractor()
        except BackboneWeightsError as exc:
            raise BackboneWeightsError(f"{exc} Or score in pixel space only with feature_scoring=False.") from exc

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        model = self._build().train()
        device = next(model.parameters()).device
        images = torch.from_numpy(self.graph_input(train)).to(device) * 2 - 1
        abar = self._alphas_bar().to(device)
        ema = copy.deepcopy(model).eval() if self.ema_decay > 0 else None
        optimiser = torch.optim.Adam(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        updates = 0
        for epoch in range(int(self.epochs)):
            total, seen = 0.0, 0
            for index in self._until_deadline(epoch_batches(len(images), int(self.batch_size), generator)):
                x0 = images[index.to(device)]
                t = torch.randint(0, int(self.timesteps), (len(x0),), generator=generator).to(device)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                a = abar[t].view(-1, 1, 1, 1)
                loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
                optimiser.step()
                updates += 1
                if ema is not None:
                    _ema_update(ema, model, min(float(self.ema_decay), (1 + updates) / (10 + updates)))
                total += float(loss.detach()) * len(index)
                seen += len(index)
            if self._record_epoch(epoch, total / seen, on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim(ema if ema is not None else model, train)):
                break
        self._set_model(ema if ema is not None else model)
        self.pixel_scale_ = self._pixel_scale(train)
        log.info("%s: %d epochs, final loss %.5f", self.name, len(self.loss_history_), self.loss_history_[-1])

    def _pixel_scale(self, train: ImageSet) -> float | None:
        """Scale that brings pixel distances to the feature distances' range (None without feature scoring),
        from a batch of training images reconstructed with ``model_``."""
        if not self.feature_scoring:
            return None
        calibration = train.subset(range(min(len(train), int(self.batch_size))))
        pixel, feature = self._distances(calibration)
        return float(feature.max() / max(pixel.max(), 1e-12))

    @contextlib.contextmanager
    def _interim(self, model, train: ImageSet):
        """Score mid-training with the model (or its EMA) as it is now, calibrated as after fit."""
        with self._interim_state([model], model_=model):
            with self._interim_state(pixel_scale_=self._pixel_scale(train)):
                yield

    def _set_model(self, model: nn.Module) -> None:
        self.model_ = model.eval()
        for parameter in self.model_.parameters():
            parameter.requires_grad_(False)

    # --- reconstruction and scoring ---------------------------------------------------------------------------
    def reconstruct(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, reconstructions) as float32 NHWC arrays in [0, 1] at ``input_size``."""
        self._check_fitted()
        self._validate_params()
        return self._reconstruct(images)

    def _reconstruct(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        device = next(self.model_.parameters()).device
        inputs = torch.from_numpy(self.graph_input(images)).to(device) * 2 - 1
        abar = self._alphas_bar().to(device)
        noise = torch.randn(inputs.shape[1:], generator=torch.Generator().manual_seed(self.seed)).to(device)
        t0, steps = int(self.t0), int(self.steps)
        sequence = [int(round(t)) for t in np.linspace(t0, 0, steps + 1)[:-1]]
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(inputs), int(self.batch_size)):
                y = inputs[start:start + int(self.batch_size)]
                x = abar[t0].sqrt() * y + (1 - abar[t0]).sqrt() * noise
                for i, t in enumerate(sequence):
                    a = abar[t]
                    a_next = abar[sequence[i + 1]] if i + 1 < len(sequence) else torch.ones_like(a)
                    eps = self.model_(x, torch.full((len(y),), t, device=device))
                    if self.guidance > 0:  # DDAD's conditioning on the input image
                        target = a.sqrt() * y + (1 - a).sqrt() * eps
                        eps = eps - (1 - a).sqrt() * self.guidance * (target - x)
                    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
                    x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
                outputs.append(x0)
        to_images = lambda t: ((t.permute(0, 2, 3, 1) + 1) / 2).float().cpu().numpy()  # noqa: E731
        return to_images(inputs), to_images(torch.cat(outputs))

    def _distances(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixel distance maps (N, H, W) and, with ``feature_scoring``, feature distance maps (N, H, W)."""
        inputs, outputs = self._reconstruct(images)
        pixel = np.abs(inputs - outputs).mean(axis=3)
        if not self.feature_scoring:
            return pixel, None
        extractor = self._feature_extractor()
        size = (int(self.input_size), int(self.input_size))
        feature = torch.zeros((len(inputs), 1, *size))
        for original, rebuilt in zip(self._features(images), extractor.features(outputs)):
            pooled = [F.avg_pool2d(torch.from_numpy(f), 3, 1, 1) for f in (original, rebuilt)]
            distance = 1 - F.cosine_similarity(pooled[0], pooled[1], dim=1)[:, None]
            feature += F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
        return pixel, feature[:, 0].numpy()

    def _score(self, images: ImageSet) -> Scores:
        if self.feature_scoring and self.pixel_scale_ is None:
            raise ValueError(f"{self.name} was fitted with feature_scoring=False; refit with feature_scoring=True "
                             "to score in feature space")
        pixel, feature = self._distances(images)
        maps = pixel if feature is None else feature + self.pixel_weight * self.pixel_scale_ * pixel
        maps = smooth_maps(maps, self.smoothing_sigma)
        return Scores(maps.reshape(len(maps), -1).max(axis=1), maps)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        state = {"pixel_scale": self.pixel_scale_}
        if self.feature_scoring:
            state.update(self._backbone_state())
        return module_tensors(self.model_), state

    def _restore(self, tensors, state):
        if self.feature_scoring:
            self._check_backbone(state)
        self.pixel_scale_ = state["pixel_scale"]
        model = self._build()
        load_module_tensors(model, tensors)
        self._set_model(model)


# --- noise schedule -----------------------------------------------------------------------------------------------
def betas(schedule: str, timesteps: int) -> np.ndarray:
    """DDPM's linear schedule (1e-4..0.02 at T = 1000, rescaled by 1000 / T) or Nichol and Dhariwal's cosine."""
    if schedule == "linear":
        scale = 1000 / timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0, 0.999)


def alphas_bar(schedule: str, timesteps: int) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s) for t = 0..T-1: x_t ~ N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
    return np.cumprod(1 - betas(schedule, timesteps))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for average, current in zip(ema.parameters(), model.parameters()):
            average.lerp_(current, 1 - decay)


# --- UNet ---------------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM): (N,) -> (N, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, and a (1x1 when needed) skip."""

    def __init__(self, inputs: int, outputs: int, embedding: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_GROUPS, inputs)
        self.conv1 = nn.Conv2d(inputs, outputs, 3, padding=1)
        self.time = nn.Linear(embedding, outputs)
        self.norm2 = nn.GroupNorm(_GROUPS, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity, as DDPM
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(inputs, outputs, 1) if inputs != outputs else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(embedding))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Single-head self-attention over positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(attended.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """DDPM noise-prediction UNet: one ResBlock per level down, two up (one per skip), attention in the middle."""

    def __init__(self, image_channels: int, channels: int, mults: tuple[int, ...]):
        super().__init__()
        embedding = 4 * channels
        self.channels = channels
        self.time = nn.Sequential(nn.Linear(channels, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.inputs = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, current = [channels], channels
        for level, mult in enumerate(mults):
            self.down.append(ResBlock(current, channels * mult, embedding))
            current = channels * mult
            skips.append(current)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skips.append(current)
        self.middle = nn.ModuleList([ResBlock(current, current, embedding), Attention(current),
                                     ResBlock(current, current, embedding)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(2):
                self.up.append(ResBlock(current + skips.pop(), channels * mult, embedding))
                current = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(current, current, 3, padding=1)))
        self.outputs = nn.Sequential(nn.GroupNorm(_GROUPS, current), nn.SiLU(),
                                     nn.Conv2d(current, image_channels, 3, padding=1))

    def forward(self, x, t):
        embedding = self.time(timestep_embedding(t, self.channels))
        h = self.inputs(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), embedding) if isinstance(layer, ResBlock) else layer(h)
        return self.outputs(h)
