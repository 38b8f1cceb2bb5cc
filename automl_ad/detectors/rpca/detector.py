"""Robust PCA: each image = a low-rank background + a sparse part that holds the anomalies (image decomposition).

Principal component pursuit (Candes, Li, Ma & Wright, "Robust principal component analysis?", JACM 2011):
min ||L||_* + lambda ||S||_1 subject to D = L + S, with lambda = ``lambda_scale`` / sqrt(max(m, n)) (the paper's
value is ``lambda_scale`` = 1), solved by the inexact augmented Lagrange multiplier method (Lin, Chen & Ma, 2010):
alternating soft thresholding of S and singular value thresholding of L, then a dual ascent step, with the
penalty mu growing by ``rho`` = 1.5 per iteration, until ||D - L - S||_F / ||D||_F < ``tol`` or ``max_iter``.

The data matrix D is the luma image itself at ``input_size`` x ``input_size`` (rows of the image as the rows of
D), as in defect inspection of periodic textures such as TFT-LCD panels (Cen et al., Neurocomputing 2015): a
texture that repeats along the image axes has few independent rows, so it is low-rank, while a defect is
small and placed at random, so it is sparse. Each test image is decomposed on its own; nothing is learnt from
the normal images, so ``fit`` only checks the parameters (``needs_training`` is False, as for the route).

Anomaly map = |S| (in grey levels, 0 to 1) smoothed with a Gaussian of ``smoothing_sigma``; image score = the
mean of the highest ``top_fraction`` of the map's values (at least one value: 0 gives the maximum).

Suited to periodic textures. On objects, and on textures that do not repeat along the image axes, the image is
not low-rank and the sparse part also takes normal structure (edges, fine detail). Two variants were tried on
the demo brick texture (crops rotated and rescaled at random) and dropped because they scored lower there: a
patch matrix (overlapping 16-pixel patches as columns; image AUROC 0.72-0.78 against 0.80-0.86), and normal
patches stacked beside the test patches so the low-rank part comes from normals (0.55). Cost: one SVD of the
image per iteration (about 30-40 iterations), so scoring is slow compared with filtering methods.
"""

from __future__ import annotations

import logging
from numbers import Integral, Real

import numpy as np
from scipy import ndimage

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector, EpochCallback, Scores
from automl_ad.detectors.parameters import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Interval
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

_RHO = 1.5  # growth of the ALM penalty per iteration (Lin et al. 2010)
_MU_GROWTH_LIMIT = 1e7  # mu stops growing at this multiple of its start


@register_detector
class RobustPCA(Detector):
    """Image-decomposition route: the sparse part of a robust PCA of each image marks its anomalies."""

    name = "rpca"
    route = "image_decomposition"
    needs_training = False
    no_graph = ("robust PCA solves an iterative optimisation per image batch (numpy SVDs until"
                " convergence), not a fixed graph")
    test_params = {"input_size": 96, "smoothing_sigma": 2.0}
    test_category = "texture"
    gray = True
    _parameter_constraints = {
        "input_size": [Interval(Integral, 16, None, closed="left")], "lambda_scale": [POSITIVE],
        "tol": [Interval(Real, 0, 1, closed="neither")], "max_iter": [POSITIVE_INT], "smoothing_sigma": [NON_NEGATIVE],
        "top_fraction": [Interval(Real, 0, 1, closed="both")],
    }

    def __init__(self, input_size=256, lambda_scale=3.0, tol=1e-7, max_iter=100, smoothing_sigma=2.0,
                 top_fraction=0.0):
        self._store_parameters(locals())

    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        """Nothing to learn: each image is decomposed on its own when it is scored."""

    def _score(self, images: ImageSet) -> Scores:
        from threadpoolctl import threadpool_limits

        gray = images.load(self.input_size, gray=True)
        maps = np.empty(gray.shape, np.float32)
        for i, image in enumerate(gray):
            matrix = image.astype(np.float64)
            # one BLAS thread: multithreading gains nothing on SVDs this small and, on a busy CPU, OpenBLAS's
            # waiting threads made each decomposition up to 100x slower
            with threadpool_limits(limits=1, user_api="blas"):
                _, sparse, iterations = robust_pca(matrix, self.lambda_scale / np.sqrt(max(matrix.shape)),
                                                   self.tol, self.max_iter)
            log.debug("%s: image %d decomposed in %d iterations", self.name, i, iterations)
            magnitude = np.abs(sparse)
            if self.smoothing_sigma > 0:
                magnitude = ndimage.gaussian_filter(magnitude, self.smoothing_sigma, truncate=4.0)
            maps[i] = magnitude
        flat = maps.reshape(len(maps), -1)
        count = max(1, int(round(self.top_fraction * flat.shape[1])))
        return Scores(np.partition(flat, -count, axis=1)[:, -count:].mean(axis=1), maps)

    def _state(self):
        return {}, {}

    def _restore(self, tensors, state):
        pass


def robust_pca(matrix: np.ndarray, lam: float, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Principal component pursuit by inexact ALM: ``(low_rank, sparse, iterations)`` with matrix = L + S."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or not np.isfinite(matrix).all():
        raise ValueError(f"robust_pca needs a finite 2-D matrix, got shape {matrix.shape}")
    norm_two = np.linalg.norm(matrix, 2)
    norm_fro = np.linalg.norm(matrix)
    low_rank = np.zeros_like(matrix)
    sparse = np.zeros_like(matrix)
    if norm_fro == 0:
        return low_rank, sparse, 0
    dual = matrix / max(norm_two, np.abs(matrix).max() / lam)
    mu = 1.25 / norm_two
    mu_max = mu * _MU_GROWTH_LIMIT
    for iteration in range(1, max_iter + 1):  # noqa: B007 - its last value is the iteration count returned
        shifted = matrix - low_rank + dual / mu
        sparse = np.sign(shifted) * np.maximum(np.abs(shifted) - lam / mu, 0)
        u, sigma, vt = np.linalg.svd(matrix - sparse + dual / mu, full_matrices=False)
        sigma = np.maximum(sigma - 1 / mu, 0)
        rank = int(np.count_nonzero(sigma))
        low_rank = (u[:, :rank] * sigma[:rank]) @ vt[:rank]
        residual = matrix - low_rank - sparse
        dual += mu * residual
        mu = min(mu * _RHO, mu_max)
        if np.linalg.norm(residual) / norm_fro < tol:
            break
    return low_rank, sparse, iteration
