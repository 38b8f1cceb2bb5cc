"""Sparse-coding novelty detection (Boracchi, Carrera & Wohlberg, "Novelty detection in images by sparse
representations", IEEE IES 2014; Carrera et al., IEEE TII 2017).

1. Patches: ``patch_size`` x ``patch_size`` pixels of the luma (or of the three colour channels with
   ``color=True``) at ``input_size``, taken every ``stride`` pixels; each patch's mean is removed with
   ``remove_mean`` (the papers' preprocessing: the dictionary codes structure, not brightness).
2. Dictionary: ``n_atoms`` atoms learnt on normal patches with scikit-learn's MiniBatchDictionaryLearning
   (objective 0.5 ||s - D x||^2 + ``alpha`` ||x||_1), on at most ``max_patches`` patches sampled from the
   training images, for at most ``max_iter`` passes over them.
3. Sparse code of each test patch with ``transform_algorithm``: ``lasso_lars`` (basis pursuit denoising with
   the same ``alpha``, as the papers) or ``omp`` (``n_nonzero_coefs`` atoms).
4. Indicator per patch: (reconstruction error ||s - D x||_2, code density ||x||_1). Anomalous patches are
   coded worse, less sparsely, or both. A Gaussian of the indicators of held-out normal patches (the sampled
   patches not used to learn the dictionary) is estimated; a patch's score is its Mahalanobis distance to it
   (the papers' confidence region on the indicator).
5. Anomaly map: each pixel averages the scores of the patches covering it, then a Gaussian blur of
   ``smoothing_sigma``; image score = the map's maximum.

Dictionary learning is iterative, but bounded by ``max_iter`` and ``max_patches`` (seconds to a minute on a
CPU) and not reported epoch by epoch (``iterative`` is False). Scoring solves one lasso per patch, so it is
slower than filtering methods.
"""

from __future__ import annotations

import logging
from numbers import Integral

import numpy as np
from scipy import ndimage

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector, EpochCallback, Scores
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Interval, Options
from automl_ad.detectors.registry import register_detector
from automl_ad.errors import InvalidParameterError

log = logging.getLogger(__name__)

ALGORITHMS = ("lasso_lars", "omp")


@register_detector
class SparseCoding(Detector):
    """Sparse-coding route: reconstruction error and code density of patches over a dictionary of normals."""

    name = "sparse_coding"
    route = "sparse_coding"
    no_graph = "each patch is sparse-coded by an iterative scikit-learn solver, not a fixed graph"
    test_params = {"input_size": 64, "patch_size": 8, "stride": 4, "n_atoms": 32, "max_patches": 4000,
                   "max_iter": 5, "remove_mean": False, "smoothing_sigma": 2.0}
    test_category = "texture"
    _parameter_constraints = {
        "input_size": [Interval(Integral, 16, None, closed="left")], "color": [bool],
        "patch_size": [Interval(Integral, 2, None, closed="left")], "stride": [POSITIVE_INT], "remove_mean": [bool],
        "n_atoms": [POSITIVE_INT], "alpha": [POSITIVE], "transform_algorithm": [Options(*ALGORITHMS)],
        "n_nonzero_coefs": [POSITIVE_INT], "max_patches": [Interval(Integral, 16, None, closed="left")],
        "max_iter": [POSITIVE_INT], "batch_size": [POSITIVE_INT], "smoothing_sigma": [NON_NEGATIVE],
        "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, input_size=256, color=False, patch_size=16, stride=8, remove_mean=True, n_atoms=128,
                 alpha=0.5, transform_algorithm="lasso_lars", n_nonzero_coefs=5, max_patches=20000, max_iter=20,
                 batch_size=256, smoothing_sigma=2.0, seed=0):
        self._store_parameters(locals())

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        from sklearn.covariance import EmpiricalCovariance
        from sklearn.decomposition import MiniBatchDictionaryLearning

        rng = np.random.default_rng(self.seed)
        images = self._load(train)
        per_image = max(1, -(-self.max_patches // len(images)))
        sample = []
        for image in images:
            patches, _ = self._patches(image)
            sample.append(patches[rng.choice(len(patches), min(per_image, len(patches)), replace=False)])
        sample = np.concatenate(sample)
        sample = sample[rng.permutation(len(sample))[:self.max_patches]]
        if len(sample) < 4:
            raise ValueError(f"{self.name}: only {len(sample)} patches from the training images; use a larger "
                             "input_size or a smaller patch_size/stride")
        learn, held_out = sample[:len(sample) // 2], sample[len(sample) // 2:]
        learner = MiniBatchDictionaryLearning(n_components=self.n_atoms, alpha=self.alpha,
                                              batch_size=self.batch_size, max_iter=self.max_iter,
                                              random_state=self.seed)
        with _one_blas_thread():
            learner.fit(learn)
        self.dictionary_ = learner.components_.astype(np.float64)
        log.info("%s: %d atoms of %d values learnt on %d patches in %d iterations", self.name, self.n_atoms,
                 learn.shape[1], len(learn), learner.n_iter_)
        gaussian = EmpiricalCovariance().fit(self._indicators(held_out))
        self.indicator_mean_ = gaussian.location_
        self.indicator_precision_ = gaussian.precision_

    def _check_parameter_relations(self) -> None:
        if self.patch_size > self.input_size:
            raise InvalidParameterError(f"{self.name}: patch_size ({self.patch_size}) must not exceed input_size "
                                        f"({self.input_size})")

    @property
    def gray(self) -> bool:
        """Luma unless ``color``."""
        return not self.color

    # --- patches and codes ------------------------------------------------------------------------------------
    def _load(self, images: ImageSet) -> np.ndarray:
        return images.load(self.input_size, gray=not self.color)

    def _patches(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(P, values) patches of one image on the stride grid, mean removed if asked, and the grid shape."""
        size = self.patch_size
        windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))
        windows = windows[::self.stride, ::self.stride]
        grid = windows.shape[:2]
        patches = windows.reshape(grid[0] * grid[1], -1).astype(np.float64)
        if self.remove_mean:
            patches -= patches.mean(axis=1, keepdims=True)
        return patches, grid

    def _indicators(self, patches: np.ndarray) -> np.ndarray:
        """(P, 2): reconstruction error and l1 norm of each patch's sparse code."""
        from sklearn.decomposition import sparse_encode

        with _one_blas_thread():
            codes = sparse_encode(patches, self.dictionary_, algorithm=self.transform_algorithm, alpha=self.alpha,
                                  n_nonzero_coefs=min(self.n_nonzero_coefs, len(self.dictionary_)))
        error = np.linalg.norm(patches - codes @ self.dictionary_, axis=1)
        return np.stack([error, np.abs(codes).sum(axis=1)], axis=1)

    # --- score ------------------------------------------------------------------------------------------------
    def _score(self, images: ImageSet) -> Scores:
        loaded = self._load(images)
        maps = np.empty(loaded.shape[:3], np.float32)
        for i, image in enumerate(loaded):
            patches, grid = self._patches(image)
            centred = self._indicators(patches) - self.indicator_mean_
            distance = np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", centred, self.indicator_precision_, centred), 0))
            maps[i] = self._to_pixels(distance.reshape(grid), image.shape[:2])
        return Scores(maps.reshape(len(maps), -1).max(axis=1), maps)

    def _to_pixels(self, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Average the scores of the patches covering each pixel (pixels no patch covers take the nearest
        patch's score), then smooth."""
        total = np.zeros(shape)
        count = np.zeros(shape)
        size, stride = self.patch_size, self.stride
        rows, cols = scores.shape
        for dy in range(size):
            for dx in range(size):
                total[dy:dy + rows * stride:stride, dx:dx + cols * stride:stride] += scores
                count[dy:dy + rows * stride:stride, dx:dx + cols * stride:stride] += 1
        covered = count > 0
        if not covered.all():
            nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
            total, count = total[tuple(nearest)], count[tuple(nearest)]
        pixels = total / count
        if self.smoothing_sigma > 0:
            pixels = ndimage.gaussian_filter(pixels, self.smoothing_sigma, truncate=4.0)
        return pixels

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        return {"dictionary": self.dictionary_, "indicator_mean": self.indicator_mean_,
                "indicator_precision": self.indicator_precision_}, {}

    def _restore(self, tensors, state):
        self.dictionary_ = tensors["dictionary"]
        self.indicator_mean_ = tensors["indicator_mean"]
        self.indicator_precision_ = tensors["indicator_precision"]


def _one_blas_thread():
    """One BLAS thread: the matrices here are small, so threads gain little, and on a busy CPU OpenBLAS's waiting
    threads made dictionary learning 3x slower."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
