"""PaDiM (Defard et al., ICPR 2021): a multivariate Gaussian of patch embeddings at every grid position.

1. Patch embeddings: feature maps of the backbone stages at ``feature_strides`` (default 8 and 16, the two
   mid stages; the paper concatenates the first three ResNet stages), the coarser maps upsampled to the finest
   grid by nearest-neighbour (each coarse cell covers its fine cells, as the official code), concatenated, and
   reduced to ``n_features`` channels by a random subset chosen once with ``seed`` (the paper keeps 100 of
   ResNet18's 448 channels and 550 of WideResNet50's 1792). By default 100, but at most half the channels: the
   paper's reduction keeps 22-31%, and 100 of MobileNetV2's 128 would keep 78% for 2.4x the Mahalanobis work of
   64 (its one memory-bound step) with no measured gain (test image AUROC / AUPRO, 100 against 64 channels: bottle
   0.998 / 0.906 and 0.996 / 0.905, magnetic_tile 0.932 / 0.727 and 0.926 / 0.735, ball_screw on 480x512 tiles
   0.952 / 0.931 and 0.953 / 0.931; 32 channels, the paper's share, lose 0.04 on magnetic_tile).
2. For every grid position (i, j): mean and covariance of the training embeddings (unbiased), the covariance
   regularised by ``epsilon * I``; the inverse covariances (through Cholesky factors) are stored.
3. Anomaly map = Mahalanobis distance of each test embedding to its position's Gaussian, upsampled to the
   input size (bilinear) and smoothed with a Gaussian (sigma 4); image score = the map's maximum.
"""

from __future__ import annotations

import logging
import math
import time
from functools import cache

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.graph_based import BackboneGraphDetector
from automl_ad.detectors.padim.graph import PadimEmbedding, PadimHead
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

#: Channels the paper keeps of ResNet18's 448; the default unless that is more than half the backbone's channels.
PAPER_FEATURES = 100
#: Bytes at the peak per value of the inverse covariances (float32): the fit holds the float64 covariances and the
#: float32 inverses (12); building the scoring graph, the array, its ONNX export and ONNX Runtime's copy (measured:
#: 16384 positions x 152 channels, a 1.44 GB model, peaked at 5.6 GB fitting and 7.0 GB scoring, 1.1 GB before).
GAUSSIAN_PEAK_BYTES = 16
_CHUNK_VALUES = 1 << 23  # values per chunk of positions (fit, float64: 64 MiB) or of images (score)


@register_detector
class Padim(BackboneGraphDetector):
    """Distribution-map route: per-position Gaussians of normal patch embeddings, Mahalanobis distance."""

    name = "padim"
    route = "distribution_map"
    needs_training = False
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64}
    _parameter_constraints = {**BACKBONE_CONSTRAINTS, "n_features": [None, POSITIVE_INT], "epsilon": [POSITIVE],
                              "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT]}

    def __init__(self, backbone="resnet18", feature_strides=(8, 16), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", n_features=None, epsilon=0.01,
                 smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- features ---------------------------------------------------------------------------------------------
    def _embed(self, features: list[np.ndarray]):
        """Embeddings (N, h*w, D) of the selected channels on the finest grid, as a CPU torch tensor."""
        import torch

        with torch.inference_mode():
            embed = PadimEmbedding(self.channels_, _finest_grid(features))
            return embed(*[torch.from_numpy(f) for f in features]).contiguous()

    def _feature_count(self, total: int) -> int:
        if self.n_features is not None and self.n_features > total:
            log.info("%s: n_features=%d > %d available channels; using all", self.name, self.n_features, total)
        return feature_count(self.n_features, total)

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        features = self._features(train)
        total = sum(f.shape[1] for f in features)
        count = self._feature_count(total)
        rng = np.random.default_rng(self.seed)
        self.channels_ = np.sort(rng.choice(total, size=count, replace=False)).astype(np.int64)
        self.feature_shape_ = _finest_grid(features)
        started = time.perf_counter()
        mean, covariance = _streamed_moments(self, features)
        positions = len(mean)
        regulariser = self.epsilon * torch.eye(count, dtype=torch.float64)
        inverse = torch.empty(positions, count, count)
        chunk = max(1, _CHUNK_VALUES // (count * count))  # positions per step, bounds the float64 copies
        for start in range(0, positions, chunk):
            inverse[start:start + chunk] = _spd_inverse(covariance[start:start + chunk] + regulariser, start).float()
        self.fit_extra_seconds_ = time.perf_counter() - started
        self.mean_ = mean.float().numpy()
        self.inv_covariance_ = inverse.numpy()
        log.info("%s: %d Gaussians of %d dimensions from %d images", self.name, len(self.mean_), count,
                 len(features[0]))

    @classmethod
    def extra_fit_seconds(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The Gaussians (step 2), which grow with the square and cube of the channels kept, not with the pixels
        alone: a D x D covariance product per training input and grid position, and a D³ inverse per position of
        one network input (a tile's grid; all tiles of a position share its Gaussian), at the seconds measured on
        this machine (a 277-channel PaDiM at strides 4, 8 and 16 ran 2.4x over a prediction linear in pixels)."""
        shape = cls._gaussians(params)
        if shape is None:
            return 0.0
        positions, dim, stride = shape
        product_s, inverse_s = _gaussian_seconds_per_value(dim)
        return (train_images * network_pixels / stride ** 2 * dim ** 2 * product_s + positions * dim ** 3 * inverse_s)

    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """``GAUSSIAN_PEAK_BYTES`` per value of the Gaussians' P x D x D inverse covariances, whatever the images."""
        shape = cls._gaussians(params)
        return 0.0 if shape is None else shape[0] * shape[1] ** 2 * GAUSSIAN_PEAK_BYTES

    @classmethod
    def _gaussians(cls, params: dict) -> tuple[int, int, int] | None:
        """(grid positions of one network input, channels kept, finest stride) of ``params``; None when the
        backbone or strides are unknown (the trial itself reports that)."""
        strides, total = cls._channels_of(params)
        if total is None:
            return None
        height, width = cls._network_input_hw(params)
        stride = min(strides)
        positions = math.ceil(height / stride) * math.ceil(width / stride)
        return positions, feature_count(params.get("n_features", cls().n_features), total), stride

    # --- score ------------------------------------------------------------------------------------------------
    def _scoring_graph(self) -> PadimHead:
        return PadimHead(PadimEmbedding(self.channels_, self.feature_shape_), self.mean_, self.inv_covariance_,
                         self.input_size, self.smoothing_sigma)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {"mean": self.mean_, "inv_covariance": self.inv_covariance_, "channels": self.channels_}
        return tensors, {"feature_shape": list(self.feature_shape_), **self._backbone_state()}

    def _restore(self, tensors, state):
        self._check_backbone(state)
        self.mean_ = tensors["mean"]
        self.inv_covariance_ = tensors["inv_covariance"]
        self.channels_ = tensors["channels"]
        self.feature_shape_ = tuple(state["feature_shape"])


def feature_count(n_features: int | None, total: int) -> int:
    """Channels kept of ``total``: ``n_features`` (all when fewer exist), by default ``PAPER_FEATURES`` but at most
    half of them (module docstring)."""
    if n_features is None:
        return max(1, min(PAPER_FEATURES, total // 2))
    return min(int(n_features), total)


@cache
def _gaussian_seconds_per_value(dim: int) -> tuple[float, float]:
    """Seconds per value of the covariance product (per sample x position x D²) and of the inverse (per position x
    D³), timed at the power of two nearest ``dim`` on random float64 data, as :func:`_streamed_moments` and
    :func:`_spd_inverse` run them."""
    import torch

    size = 1 << max(3, min(9, round(math.log2(max(dim, 1)))))
    positions, samples = 16, 32
    centred = torch.randn(positions, samples, size, dtype=torch.float64)
    outer = torch.zeros(positions, size, size, dtype=torch.float64)
    spd = centred.transpose(1, 2) @ centred + size * torch.eye(size, dtype=torch.float64)

    def per_run(work) -> float:
        work()  # warm-up
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < 0.02:
            work()
            runs += 1
        return (time.perf_counter() - started) / runs

    product = per_run(lambda: outer.baddbmm_(centred.transpose(1, 2), centred))
    inverse = per_run(lambda: _spd_inverse(spd, 0))
    return product / (positions * samples * size ** 2), inverse / (positions * size ** 3)


def _spd_inverse(matrices, first_position: int):
    """Inverses of symmetric positive-definite matrices (b, D, D) through their Cholesky factors: half the work
    of LU, and torch 2.14's batched LU inverse fails on CPU ("Pivots given to lu_solve ...") once
    ``torch.set_num_threads`` has run, as it does in every search trial."""
    import torch

    factor, info = torch.linalg.cholesky_ex(matrices)
    failed = torch.nonzero(info).flatten()
    if len(failed):
        raise ValueError(f"padim: the regularised covariance at grid position {first_position + int(failed[0])} is "
                         "not positive definite (non-finite or degenerate features); raise epsilon or check the "
                         "training images")
    return torch.cholesky_inverse(factor)


def _finest_grid(features: list[np.ndarray]) -> tuple[int, int]:
    return max((tuple(int(s) for s in f.shape[-2:]) for f in features), key=lambda shape: shape[0] * shape[1])


def _streamed_moments(padim: Padim, features: list[np.ndarray]):
    """Per-position mean (P, D) and unbiased covariance (P, D, D), float64, accumulated over image chunks, so the
    (N, P, D) embedding of the whole training set is never held at once. Sums are taken around the first chunk's
    mean (a shifted two-moment accumulation, numerically as stable as the two-pass formula)."""
    import torch

    n = len(features[0])
    height, width = _finest_grid(features)
    step = max(1, _CHUNK_VALUES // (height * width * len(padim.channels_)))  # images per chunk
    shift = total = outer = None
    for start in range(0, n, step):
        batch = padim._embed([f[start:start + step] for f in features]).double()  # (b, P, D)
        if shift is None:
            shift = batch.mean(dim=0)
            total = torch.zeros_like(shift)
            outer = torch.zeros(*shift.shape, shift.shape[1], dtype=torch.float64)
        centred = (batch - shift).transpose(0, 1)  # (P, b, D)
        total += centred.sum(dim=1)
        outer.baddbmm_(centred.transpose(1, 2), centred)
    mean = total / n
    # in place: (P, D, D) float64 is the fit's largest array (3 GB at 512x512, stride 4 and 152 channels), and the
    # out-of-place formula held three of them at once (a fit peaked at 9.8 GB for a 1.4 GB model)
    covariance = outer.baddbmm_(mean[:, :, None], mean[:, None, :], alpha=-n).div_(max(n - 1, 1))
    return mean + shift, covariance
