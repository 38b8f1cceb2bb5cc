"""One-class SVM (Schoelkopf et al., Neural Computation 2001) on globally pooled backbone features.

1. Image descriptor: every backbone stage at ``feature_strides`` pooled over the whole image - its average and
   maximum (``pooling="avgmax"``) or its average alone (``"avg"``) - concatenated, then standardised per
   dimension with the training images' mean and standard deviation (scikit-learn's StandardScaler).
2. scikit-learn's OneClassSVM with ``kernel`` and ``nu`` (an upper bound on the fraction of training images
   outside the boundary and a lower bound on the fraction of support vectors); the kernel's gamma is
   ``gamma_scale`` x scikit-learn's ``"scale"`` value 1 / (dimensions x variance). With the RBF kernel the
   OC-SVM hyperplane and the SVDD minimum enclosing hypersphere (Tax & Duin 2004) give the same decision
   function, since k(x, x) is constant, so ``kernel="rbf"`` is also the SVDD of the route.
3. Image score = minus the signed distance to the boundary (``decision_function``), so higher = more anomalous.

The route decides per image and does not localise (``localization="none"``, the default: no maps). With
``localization="sliding"`` it localises by sliding regions, as the route suggests: the stages are resized to the
finest selected grid, every ``window`` x ``window`` cell region (stride one cell) is pooled like the image, and a
second OC-SVM of the same settings is fitted on up to ``max_windows`` regions sampled from the normal images;
each cell's score is the mean score of the regions covering it, upsampled to the input size and smoothed with
a Gaussian of ``smoothing_sigma``. Cost of ``sliding``: libsvm fits in time between quadratic and cubic in the
number of samples, so the region model dominates the fit (about ``max_windows`` / number of images times the
image-level samples); scoring evaluates one kernel row per region instead of per image ((grid - window + 1)^2
regions, 169 for a 16 x 16 grid and window 4), and maps cost memory. Image scores stay those of the image-level
model in both modes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback, Scores
from automl_ad.detectors.blocks import upsample_and_smooth
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS, BackboneDetector
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Interval, Options
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

POOLINGS = ("avg", "avgmax")
KERNELS = ("rbf", "linear", "poly", "sigmoid")
LOCALIZATIONS = ("none", "sliding")


@register_detector
class OneClassSvm(BackboneDetector):
    """Classification-surface route: a one-class SVM boundary around pooled features of normal images."""

    name = "ocsvm"
    route = "classification_surface"
    supports_localization = False
    no_graph = "the decision function is a scikit-learn one-class SVM, not a torch graph"
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64}
    test_category = "object"
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, "pooling": [Options(*POOLINGS)], "kernel": [Options(*KERNELS)],
        "nu": [Interval(Real, 0, 1, closed="right")], "gamma_scale": [POSITIVE],
        "localization": [Options(*LOCALIZATIONS)], "window": [POSITIVE_INT],
        "max_windows": [Interval(Integral, 2, None, closed="left")], "smoothing_sigma": [NON_NEGATIVE],
        "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(16, 32), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", pooling="avgmax", kernel="rbf",
                 nu=0.1, gamma_scale=1.0, localization="none", window=4, max_windows=5000, smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- descriptors ------------------------------------------------------------------------------------------
    def _pooled(self, features: list[np.ndarray]) -> np.ndarray:
        """(N, D) image descriptors: each stage averaged (and max-pooled) over the whole image."""
        parts = [f.mean(axis=(2, 3)) for f in features]
        if self.pooling == "avgmax":
            parts += [f.max(axis=(2, 3)) for f in features]
        return np.concatenate(parts, axis=1)

    def _regions(self, features: list[np.ndarray]) -> np.ndarray:
        """(N, rows, cols, D) descriptors of every window x window cell region of the finest selected grid,
        pooled like the image descriptor."""
        import torch
        import torch.nn.functional as F

        height, width = max((f.shape[-2:] for f in features), key=lambda shape: shape[0] * shape[1])
        if self.window > min(height, width):
            raise ValueError(f"window={self.window} cells exceeds the {height}x{width} feature grid; use a smaller "
                             "window or a larger input_size")
        maps = [torch.from_numpy(f) for f in features]
        maps = [m if m.shape[-2:] == (height, width) else
                F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps]
        parts = [F.avg_pool2d(m, self.window, stride=1) for m in maps]
        if self.pooling == "avgmax":
            parts += [F.max_pool2d(m, self.window, stride=1) for m in maps]
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1).numpy()

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        features = self._features(train)
        self.boundary_ = self._fit_boundary(self._pooled(features))
        log.info("%s: %d of %d training images are support vectors", self.name, len(self.boundary_.support),
                 len(train))
        if self.localization == "sliding":
            regions = self._regions(features)
            regions = regions.reshape(-1, regions.shape[-1])
            if len(regions) > self.max_windows:
                rng = np.random.default_rng(self.seed)
                regions = regions[np.sort(rng.choice(len(regions), self.max_windows, replace=False))]
            self.region_boundary_ = self._fit_boundary(regions)
            log.info("%s: region model on %d windows, %d support vectors", self.name, len(regions),
                     len(self.region_boundary_.support))

    def _fit_boundary(self, descriptors: np.ndarray) -> Boundary:
        """Standardise (N, D) descriptors and fit scikit-learn's OneClassSVM on them."""
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        scaler = StandardScaler().fit(descriptors.astype(np.float64))
        scaled = scaler.transform(descriptors.astype(np.float64))
        variance = scaled.var()
        gamma = self.gamma_scale / (scaled.shape[1] * (variance if variance > 0 else 1.0))
        svm = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=gamma).fit(scaled)
        return Boundary(self.kernel, gamma, float(svm.coef0), int(svm.degree), scaler.mean_, scaler.scale_,
                        svm.support_vectors_, svm.dual_coef_[0], float(svm.intercept_[0]))

    # --- score ------------------------------------------------------------------------------------------------
    def _score(self, images: ImageSet) -> Scores:
        features = self._features(images)
        scores = -self.boundary_.decision(self._pooled(features))
        if self.localization == "none":
            return Scores(scores, None)
        regions = self._regions(features)
        n, rows, cols, dim = regions.shape
        region_scores = -self.region_boundary_.decision(regions.reshape(-1, dim)).reshape(n, rows, cols)
        return Scores(scores, upsample_and_smooth(_spread(region_scores, self.window), self.input_size,
                                                  self.smoothing_sigma))

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors, state = self.boundary_.state("")
        if self.localization == "sliding":
            region_tensors, region_state = self.region_boundary_.state("region_")
            tensors.update(region_tensors)
            state.update(region_state)
        return tensors, {**state, **self._backbone_state()}

    def _restore(self, tensors, state):
        self._check_backbone(state)
        self.boundary_ = Boundary.from_state(tensors, state, "")
        if self.localization == "sliding":
            self.region_boundary_ = Boundary.from_state(tensors, state, "region_")


@dataclass
class Boundary:
    """A fitted one-class SVM as plain arrays: standardisation, support vectors, dual coefficients, intercept.

    ``decision`` is libsvm's decision function sum_i alpha_i k(sv_i, x) + intercept, evaluated with
    scikit-learn's kernels, so a saved model needs no pickle and scores identically after loading.
    """

    kernel: str
    gamma: float
    coef0: float
    degree: int
    mean: np.ndarray
    scale: np.ndarray
    support: np.ndarray
    dual_coef: np.ndarray
    intercept: float

    def decision(self, descriptors: np.ndarray) -> np.ndarray:
        """Signed distance to the boundary (positive inside, i.e. normal) for (N, D) descriptors."""
        from sklearn.metrics.pairwise import pairwise_kernels

        scaled = (descriptors.astype(np.float64) - self.mean) / self.scale
        kernel = pairwise_kernels(scaled, self.support, metric=self.kernel, filter_params=True, gamma=self.gamma,
                                  coef0=self.coef0, degree=self.degree)
        return kernel @ self.dual_coef + self.intercept

    def state(self, prefix: str) -> tuple[dict, dict]:
        tensors = {prefix + k: getattr(self, k) for k in ("mean", "scale", "support", "dual_coef")}
        return tensors, {prefix + k: getattr(self, k) for k in ("kernel", "gamma", "coef0", "degree", "intercept")}

    @classmethod
    def from_state(cls, tensors: dict, state: dict, prefix: str) -> Boundary:
        return cls(**{k: tensors[prefix + k] for k in ("mean", "scale", "support", "dual_coef")},
                   **{k: state[prefix + k] for k in ("kernel", "gamma", "coef0", "degree", "intercept")})


def _spread(region_scores: np.ndarray, window: int) -> np.ndarray:
    """(N, rows + window - 1, cols + window - 1) cell scores: the mean over the regions covering each cell."""
    n, rows, cols = region_scores.shape
    total = np.zeros((n, rows + window - 1, cols + window - 1))
    count = np.zeros(total.shape[1:])
    for dy in range(window):
        for dx in range(window):
            total[:, dy:dy + rows, dx:dx + cols] += region_scores
            count[dy:dy + rows, dx:dx + cols] += 1
    return (total / count).astype(np.float32)
