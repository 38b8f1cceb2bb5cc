"""CutPaste (Li et al., CVPR 2021), patch-level 3-way variant: a pretrained CNN fine-tuned to tell normal patches
from CutPaste and CutPaste-Scar patches; a Gaussian density of its patch embeddings scores and localises.

1. Augmentations (on random ``patch_size`` crops of the training images, the paper's patch-level training):
   * cut-paste: a rectangle of ``area_ratio`` x the crop area and aspect ratio log-uniform in
     [``aspect_ratio``, 1/``aspect_ratio``] is cut, colour-jittered (brightness, contrast, saturation, hue by up to
     ``jitter``) and pasted at another random place;
   * scar: a thin long rectangle (``scar_width`` x ``scar_length`` pixels) is cut, colour-jittered, rotated by up
     to +-``scar_rotation`` degrees and pasted at a random place.
   Value ranges follow the reference implementations (area 0.02-0.15, aspect 0.3, scar 2-16 x 10-25 px at
   256 px, rotation 45 degrees, jitter 0.1).
2. Classifier: the pretrained timm backbone of the project's feature extractor (a copy, same weights and creation
   arguments) up to ``feature_strides[-1]``, global average pooling, an MLP projection head (``head_dims``,
   ReLU between layers; by default the reference PyTorch implementation's eight 512-wide layers and a 128-wide
   output) and a linear layer to 3 classes (normal / cut-paste / scar). Trained with cross-entropy, SGD
   (``learning_rate``, ``momentum``, ``weight_decay``; 0.03, 0.9 and 3e-5 by default, as the reference) with
   cosine annealing over ``epochs``; each epoch draws one crop per training image and its two augmented
   versions. The backbone's BatchNorm statistics stay frozen (batches are small on a CPU, and backbones with
   folded BatchNorm, such as the shared MobileNetV2, would be broken by re-estimated statistics). Such a
   backbone has no normalisation left while it trains: it needs a lower learning rate (about 0.003), and the
   eight-layer head learns nothing within a few epochs; a CPU budget is better spent with ``head_dims=(512,
   128)``.
3. Density: the pooled backbone embeddings (the representation before the projection head), L2-normalised as in
   the reference implementation, of every ``patch_size`` patch at ``patch_stride`` of the normal training
   images; one Gaussian with scikit-learn's Ledoit-Wolf shrunk covariance.
4. Scores: the Mahalanobis distance of each patch embedding. Anomaly map: each pixel averages the scores of the
   patches that cover it (receptive-field upsampling), then a Gaussian blur (``smoothing_sigma``); image score =
   the largest patch score (the paper max-pools the patch score map for detection). The paper extracts patches
   at stride 4; on a CPU the default stride is 16 (every extra stride halving costs 4x the scoring time).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from numbers import Real

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback, Scores
from automl_ad.detectors.blocks import upsample_and_smooth
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS, BackboneDetector
from automl_ad.detectors.parameters import (
    DECAY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    TupleOf,
)
from automl_ad.detectors.registry import register_detector
from automl_ad.errors import InvalidParameterError

log = logging.getLogger(__name__)

_PATCH_BATCH = 256  # patches per forward pass when embedding
#: Bytes per value of the training patches' embeddings at the density fit's peak: the float32 parts and their
#: concatenation, the float64 copy, and scikit-learn's Ledoit-Wolf estimate's centred copy and squares (measured
#: with MobileNetV2 on 256 px inputs: 27 bytes more per value from 64 to 256 images)
_DENSITY_PEAK_BYTES = 32


@register_detector
class CutPaste(BackboneDetector):
    """Self-supervised route: a CNN fine-tuned to recognise cut-and-pasted patches; patch Gaussian density."""

    name = "cutpaste"
    square_network_input = True
    route = "self_supervised"
    no_graph = "its maps accumulate patch scores over overlapping crops with numpy, outside a torch graph"
    iterative = True
    trains_on_anomalies = ("cutpaste", "scar")
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "patch_size": 32,
                   "patch_stride": 16, "epochs": 3, "batch_size": 8, "head_dims": (128, 64), "learning_rate": 0.003}
    _parameter_constraints = {
        # it fine-tunes the backbone: no feature cache, no static int8 network
        **{k: v for k, v in BACKBONE_CONSTRAINTS.items() if k not in ("cache_features", "precision")},
        "patch_size": [POSITIVE_INT], "patch_stride": [POSITIVE_INT], "head_dims": [TupleOf(POSITIVE_INT)],
        "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT], "learning_rate": [POSITIVE], "momentum": [DECAY],
        "weight_decay": [NON_NEGATIVE], "area_ratio": [TupleOf(Interval(Real, 0, 1, closed="neither"), pair=True)],
        "aspect_ratio": [Interval(Real, 0, 1, closed="right")],
        "scar_width": [TupleOf(Interval(Real, 1, None, closed="left"), pair=True)],
        "scar_length": [TupleOf(Interval(Real, 1, None, closed="left"), pair=True)],
        "scar_rotation": [Interval(Real, 0, 180, closed="both")], "jitter": [NON_NEGATIVE],
        "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(32,), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", patch_size=32, patch_stride=16, head_dims=(512, 512, 512, 512, 512, 512,
                 512, 512, 128), epochs=256, batch_size=32, learning_rate=0.03, momentum=0.9, weight_decay=3e-5,
                 area_ratio=(0.02, 0.15), aspect_ratio=0.3, scar_width=(2, 16), scar_length=(10, 25),
                 scar_rotation=45.0, jitter=0.1, smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    def _check_parameter_relations(self) -> None:
        if self.patch_size > self.input_size:
            raise InvalidParameterError(f"{self.name}: patch_size ({self.patch_size}) must not exceed input_size "
                                        f"({self.input_size})")

    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The training images at network size (float32, held through the fit) and the density fit's copies of every
        training patch's embedding (``_DENSITY_PEAK_BYTES`` per value)."""
        strides, channels = cls._channels_at_strides(params)
        if channels is None:  # unknown backbone or stride: the trial reports it
            return 0.0
        side = int(params.get("input_size", cls().input_size))
        inputs = train_images * network_pixels / (side * side)
        patches = len(patch_origins(side, min(side, int(params.get("patch_size", cls().patch_size))),
                                    int(params.get("patch_stride", cls().patch_stride))))
        return 4.0 * 3 * train_images * network_pixels + _DENSITY_PEAK_BYTES * inputs * patches * channels[-1]

    @classmethod
    def scoring_pixels(cls, params: dict, pixels: float) -> float:
        """Every ``patch_size`` patch at ``patch_stride`` goes through the network (stride 8 instead of the default
        16: 3.7x the pixels); the density fit runs the same on each training image."""
        defaults = cls()
        side = int(params.get("input_size", defaults.input_size))
        size = min(side, int(params.get("patch_size", defaults.patch_size)))
        patches = len(patch_origins(side, size, int(params.get("patch_stride", defaults.patch_stride))))
        return pixels * patches * size * size / (side * side)

    # --- network ----------------------------------------------------------------------------------------------
    def _new_backbone(self):
        """A trainable copy of the feature extractor's pretrained backbone (same weights and creation args), in
        channels-last memory format (about 2x faster on CPU for training and inference)."""
        import torch

        network = copy.deepcopy(self._extractor().model).to(memory_format=torch.channels_last)
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        return network

    def _embed_patches(self, network, pixels: np.ndarray):
        """L2-normalised pooled embeddings (N, P, C) of every patch of (N, S, S, 3) images and the patch
        origins (P, 2). Patches of several images share a forward pass (about ``_PATCH_BATCH`` at a time)."""
        import torch
        import torch.nn.functional as F

        extractor = self._extractor()
        origins = patch_origins(self.input_size, int(self.patch_size), int(self.patch_stride))
        size = int(self.patch_size)
        group = max(1, _PATCH_BATCH // len(origins))
        embeddings = []
        network.eval()
        with torch.inference_mode():
            for start in range(0, len(pixels), group):
                batch = extractor.normalise(pixels[start:start + group])
                patches = torch.stack([batch[:, :, y:y + size, x:x + size] for y, x in origins], dim=1)
                patches = patches.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                pooled = network(patches)[-1].mean(dim=(2, 3))
                embeddings.append(F.normalize(pooled, dim=1).float().cpu().reshape(len(batch), len(origins), -1))
        return torch.cat(embeddings).numpy(), origins

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch
        from torch import nn

        extractor = self._extractor()
        device = extractor.device
        pixels = self.network_pixels(train)
        network = self._new_backbone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = projection_head(extractor.channels[-1], tuple(int(h) for h in self.head_dims)).to(device)
        parameters = list(network.parameters()) + list(head.parameters())
        optimiser = torch.optim.SGD(parameters, lr=self.learning_rate, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=int(self.epochs))
        rng = np.random.default_rng(self.seed)
        batch_size, size = int(self.batch_size), int(self.patch_size)
        for epoch in range(int(self.epochs)):
            network.train()
            for module in network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
            head.train()
            order = rng.permutation(len(pixels))
            total, seen = 0.0, 0
            for start in self._until_deadline(range(0, len(order), batch_size)):
                crops = [random_crop(pixels[i], size, rng) for i in order[start:start + batch_size]]
                batch = crops + [self._cut_paste(c, rng) for c in crops] + [self._scar(c, rng) for c in crops]
                labels = torch.arange(3, device=device).repeat_interleave(len(crops))
                inputs = extractor.normalise(np.stack(batch)).contiguous(memory_format=torch.channels_last)
                pooled = network(inputs)[-1].mean(dim=(2, 3))
                loss = nn.functional.cross_entropy(head(pooled), labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(crops)
                seen += len(crops)
            schedule.step()
            if self._record_epoch(epoch, total / seen, on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim(network, pixels)):
                break
        self._set_network(network)
        self.mean_, self.precision_ = self._density(network, pixels)
        log.info("%s: %d epochs, final loss %.4f; Gaussian of the training patch embeddings", self.name,
                 len(self.loss_history_), self.loss_history_[-1])

    def _density(self, network, pixels) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (Ledoit-Wolf) precision of the training patches' embeddings under ``network``."""
        from sklearn.covariance import LedoitWolf

        embeddings, _ = self._embed_patches(network, pixels)
        embeddings = embeddings.reshape(-1, embeddings.shape[-1]).astype(np.float64)
        return embeddings.mean(axis=0), LedoitWolf().fit(embeddings).precision_

    @contextlib.contextmanager
    def _interim(self, network, pixels):
        """Score mid-training: the Gaussian is re-estimated with the network as it is now."""
        with self._interim_state([network], network_=network):
            mean, precision = self._density(network, pixels)
            with self._interim_state(mean_=mean, precision_=precision):
                yield

    def _cut_paste(self, crop, rng):
        return cut_paste(crop, rng, tuple(self.area_ratio), float(self.aspect_ratio), float(self.jitter))

    def _scar(self, crop, rng):
        return scar(crop, rng, tuple(self.scar_width), tuple(self.scar_length), float(self.scar_rotation),
                    float(self.jitter))

    def _set_network(self, network) -> None:
        self.network_ = network.eval()
        for parameter in self.network_.parameters():
            parameter.requires_grad_(False)

    # --- score ------------------------------------------------------------------------------------------------
    def _score(self, images: ImageSet) -> Scores:
        embeddings, origins = self._embed_patches(self.network_, self.network_pixels(images))
        centred = embeddings.astype(np.float64) - self.mean_
        scores = np.sqrt(np.maximum(np.einsum("npc,cd,npd->np", centred, self.precision_, centred), 0))
        maps = receptive_field_maps(scores, origins, self.input_size, int(self.patch_size))
        maps = upsample_and_smooth(maps, self.input_size, self.smoothing_sigma)
        return Scores(scores.max(axis=1), maps)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {f"network.{k}": v.detach().cpu().numpy() for k, v in self.network_.state_dict().items()}
        tensors.update(mean=self.mean_, precision=self.precision_)
        return tensors, self._backbone_state()

    def _restore(self, tensors, state):
        import torch

        self._check_backbone(state)
        network = self._new_backbone()
        device = self._extractor().device
        network.load_state_dict({k.removeprefix("network."): torch.from_numpy(v).to(device)
                                 for k, v in tensors.items() if k.startswith("network.")})
        self._set_network(network)
        self.mean_, self.precision_ = tensors["mean"], tensors["precision"]


def projection_head(in_dim: int, head_dims: tuple[int, ...]):
    """MLP projection head (Linear + ReLU per layer but the last) followed by a 3-way linear classifier."""
    from torch import nn

    layers, width = [], in_dim
    for i, out in enumerate(head_dims):
        layers.append(nn.Linear(width, out))
        if i < len(head_dims) - 1:
            layers.append(nn.ReLU())
        width = out
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def patch_origins(image_size: int, patch_size: int, stride: int) -> np.ndarray:
    """Top-left corners (P, 2) of patches every ``stride`` pixels; the last row/column always reaches the edge."""
    starts = sorted(set(range(0, image_size - patch_size + 1, stride)) | {image_size - patch_size})
    return np.array([(y, x) for y in starts for x in starts], dtype=np.int64)


def receptive_field_maps(scores: np.ndarray, origins: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """(N, S, S) maps where each pixel is the mean score of the patches covering it, from (N, P) patch scores."""
    total = np.zeros((len(scores), image_size, image_size), np.float64)
    count = np.zeros((image_size, image_size), np.float64)
    for p, (y, x) in enumerate(origins):
        total[:, y:y + patch_size, x:x + patch_size] += scores[:, p, None, None]
        count[y:y + patch_size, x:x + patch_size] += 1
    return (total / count).astype(np.float32)


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop of an (H, W, 3) image."""
    y = int(rng.integers(0, image.shape[0] - size + 1))
    x = int(rng.integers(0, image.shape[1] - size + 1))
    return image[y:y + size, x:x + size]


_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # luma weights, as torchvision's grayscale


def colour_jitter(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style ColorJitter on an (h, w, 3) float patch in [0, 1]: brightness, contrast and saturation
    scaled by factors in [1 - s, 1 + s], hue shifted by up to s (s = ``strength``), in that order."""
    if strength == 0:
        return patch
    from skimage.color import hsv2rgb, rgb2hsv

    brightness, contrast, saturation = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3)
    out = np.clip(patch * brightness, 0, 1)
    mean = (out @ _GRAY).mean()
    out = np.clip((out - mean) * contrast + mean, 0, 1)
    gray = (out @ _GRAY)[..., None]
    out = np.clip((out - gray) * saturation + gray, 0, 1)
    hsv = rgb2hsv(out)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-min(strength, 0.5), min(strength, 0.5))) % 1.0
    return hsv2rgb(hsv).astype(patch.dtype)


def cut_paste(image: np.ndarray, rng: np.random.Generator, area_ratio=(0.02, 0.15), aspect_ratio=0.3,
              jitter=0.1) -> np.ndarray:
    """CutPaste: a copy of ``image`` with a jittered rectangle of itself pasted at another random place."""
    height, width = image.shape[:2]
    area = rng.uniform(*area_ratio) * height * width
    aspect = math.exp(rng.uniform(math.log(aspect_ratio), -math.log(aspect_ratio)))
    cut_w = int(min(width, max(1, round(math.sqrt(area * aspect)))))
    cut_h = int(min(height, max(1, round(math.sqrt(area / aspect)))))
    y, x = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    patch = colour_jitter(image[y:y + cut_h, x:x + cut_w], jitter, rng)
    y, x = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    out = image.copy()
    out[y:y + cut_h, x:x + cut_w] = patch
    return out


def scar(image: np.ndarray, rng: np.random.Generator, width=(2, 16), length=(10, 25), rotation=45.0,
         jitter=0.1) -> np.ndarray:
    """CutPaste-Scar: a copy of ``image`` with a thin long jittered rectangle of itself, rotated, pasted at a
    random place (only the rotated rectangle's pixels change)."""
    from scipy import ndimage

    height, img_width = image.shape[:2]
    cut_w = int(min(img_width, max(1, round(rng.uniform(*width)))))
    cut_h = int(min(height, max(1, round(rng.uniform(*length)))))
    y, x = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, img_width - cut_w + 1))
    patch = colour_jitter(image[y:y + cut_h, x:x + cut_w], jitter, rng)
    rgba = np.concatenate([patch, np.ones((cut_h, cut_w, 1), patch.dtype)], axis=2)
    rotated = ndimage.rotate(rgba, float(rng.uniform(-rotation, rotation)), reshape=True, order=0)
    rotated = rotated[:height, :img_width]  # a rotated scar wider than the image is clipped
    rot_h, rot_w = rotated.shape[:2]
    y, x = int(rng.integers(0, height - rot_h + 1)), int(rng.integers(0, img_width - rot_w + 1))
    out = image.copy()
    region = out[y:y + rot_h, x:x + rot_w]
    mask = rotated[..., 3:] > 0.5
    out[y:y + rot_h, x:x + rot_w] = np.where(mask, rotated[..., :3], region)
    return out
