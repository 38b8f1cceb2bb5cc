"""Gaussian model of normal appearance over a small filter bank (the statistical route).

1. Working images: luma at ``input_size`` x ``input_size``.
2. Local features per pixel, at each Gaussian scale sigma in ``scales`` (pixels of the working size): local mean,
   local standard deviation, and the scale-normalised Gaussian-derivative responses (sigma*Ix, sigma*Iy,
   sigma^2*Ixx, sigma^2*Iyy, sigma^2*Ixy) - a steerable filter bank (the "local jet"); 7 features per scale.
3. Two models of the features of normal images (``mode``):

   * ``per_position`` (aligned images): a mean and covariance per pixel position over the training images,
     regularised by ``regularisation`` x the feature's overall variance on the diagonal (a floor for positions
     that never vary, such as a saturated background);
   * ``shared`` (unaligned textures): one multivariate Gaussian over the feature vectors of all pixels, fitted on
     a random subsample of ``max_samples`` vectors with a robust covariance estimator from scikit-learn
     (``covariance``: Ledoit-Wolf shrinkage, or the Minimum Covariance Determinant);
   * ``auto``: ``per_position`` when the training images align well enough - the project's own measure,
     :func:`automl_ad.profiling.structure.alignment_stats` at 128 px, ``per_position_viable`` - else ``shared``.
     The choice is stored in ``mode_``.

4. Anomaly map: the Mahalanobis distance of each pixel's features, smoothed with a Gaussian of
   ``smoothing_sigma``; image score = maximum of the map.

Estimating the mean and covariance is this route's training (``needs_training``), but it is one pass over the
data, not an iterative optimisation.
"""

from __future__ import annotations

import logging
from numbers import Integral

import numpy as np
import torch

from automl_ad.data.imageset import ImageSet
from automl_ad.data.io import resize_image
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.gaussian.graph import FEATURES_PER_SCALE, GaussianGraph, LocalFeatures
from automl_ad.detectors.graph_based import GraphDetector
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, Interval, Options, TupleOf
from automl_ad.detectors.registry import register_detector
from automl_ad.profiling.structure import alignment_stats

log = logging.getLogger(__name__)

MODES = ("auto", "per_position", "shared")
COVARIANCES = ("ledoit_wolf", "min_cov_det")
_ALIGNMENT_SIZE = 128
_FIT_BATCH = 8  # images whose features are computed at once during fit


@register_detector
class GaussianModel(GraphDetector):
    """Statistical route: Mahalanobis distance of local filter-bank features to a Gaussian of normal ones."""

    name = "gaussian"
    route = "statistical"
    gray = True
    test_params = {"input_size": 64, "scales": (1.0, 2.0), "smoothing_sigma": 2.0}
    test_category = "object"
    _parameter_constraints = {
        "input_size": [Interval(Integral, 16, None, closed="left")], "mode": [Options(*MODES)],
        "scales": [TupleOf(POSITIVE)], "regularisation": [POSITIVE], "covariance": [Options(*COVARIANCES)],
        "max_samples": [Interval(Integral, 100, None, closed="left")], "smoothing_sigma": [NON_NEGATIVE],
        "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, input_size=256, mode="auto", scales=(2.0, 4.0), regularisation=0.01,
                 covariance="ledoit_wolf", max_samples=20000, smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        images = train.load(self.input_size, gray=True)
        self.mode_ = self.mode if self.mode != "auto" else self._choose_mode(images)
        if self.mode_ == "per_position":
            self._fit_per_position(images)
        else:
            self._fit_shared(images)

    def _choose_mode(self, images: np.ndarray) -> str:
        small = np.stack([resize_image(image, _ALIGNMENT_SIZE) for image in images])
        stats = alignment_stats(small)
        mode = "per_position" if stats.per_position_viable else "shared"
        log.info("%s: mode 'auto' chose %s (normals correlate %.2f with their median without registration)",
                 self.name, mode, stats.raw_correlation)
        return mode

    def _fit_per_position(self, images: np.ndarray) -> None:
        count = len(images)
        if count < 2:
            raise ValueError(f"{self.name} per_position needs at least 2 normal images, got {count}")
        total = second = 0.0
        for features in self._local_features(images):  # streaming sums keep memory at a few images' features
            total = total + features.sum(axis=0)
            second = second + np.einsum("nhwi,nhwj->hwij", features, features)
        mean = total / count
        covariance = (second - count * mean[..., :, None] * mean[..., None, :]) / (count - 1)
        overall = np.einsum("hwdd->d", second) / (count * mean[..., 0].size) - mean.mean(axis=(0, 1)) ** 2
        covariance += np.diag(self.regularisation * np.maximum(overall, 1e-12))
        self.location_ = mean.astype(np.float32)
        self.precision_ = np.linalg.inv(covariance).astype(np.float32)

    def _fit_shared(self, images: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf, MinCovDet

        rng = np.random.default_rng(self.seed)
        per_image = max(1, self.max_samples // len(images))
        samples = []
        for features in self._local_features(images):
            for image_features in features.reshape(len(features), -1, len(self.scales) * FEATURES_PER_SCALE):
                count = len(image_features)
                samples.append(image_features[rng.choice(count, min(per_image, count), replace=False)])
        samples = np.concatenate(samples)
        estimator = (LedoitWolf() if self.covariance == "ledoit_wolf"
                     else MinCovDet(random_state=self.seed)).fit(samples)
        self.location_ = estimator.location_.astype(np.float32)
        self.precision_ = estimator.precision_.astype(np.float32)

    # --- features and scoring ---------------------------------------------------------------------------------
    def _local_features(self, images: np.ndarray):
        """Local features (n, H, W, 7 x len(scales)), float64, of (N, H, W) gray images, a few images at a time
        (the scoring graph's own filter bank)."""
        bank = LocalFeatures(self.scales, self.input_size)
        with torch.inference_mode():
            for start in range(0, len(images), _FIT_BATCH):
                yield bank(torch.from_numpy(images[start:start + _FIT_BATCH, None])).double().numpy()

    def _scoring_graph(self) -> GaussianGraph:
        return GaussianGraph(LocalFeatures(self.scales, self.input_size), self.location_, self.precision_,
                             self.mode_ == "per_position", self.input_size, self.smoothing_sigma)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        return {"location": self.location_, "precision": self.precision_}, {"mode": self.mode_}

    def _restore(self, tensors, state):
        self.location_ = tensors["location"]
        self.precision_ = tensors["precision"]
        self.mode_ = state["mode"]
