"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

1. Patch features from two mid-level stages (strides 8 and 16), each averaged over its 3x3 neighbourhood
   (local awareness; zero padding counts at the border, as the official unfold-based code), the coarser map
   upsampled to the finer grid, concatenated (optionally reduced to ``embedding_dim`` channels by adaptive
   average pooling, as in the paper).
2. Greedy k-center coreset of ``coreset_ratio`` of all training patches, run on a Gaussian random projection
   of the features (Johnson-Lindenstrauss) for speed; the bank keeps the full features. Default ratio 1%: the
   paper reports PatchCore-1% within 0.1 points of PatchCore-10% on MVTec AD, and on bottle we measured AUPRO
   0.924 against 0.926, for a tenth of the selection cost and bank size (the search explores 0.1% to 10%).
   The paper projects 1024-d features to 128; we default to 64 dimensions: on a 2-core CPU each greedy step is a
   memory-bound matrix-vector product, 64 dimensions make it ~4x faster, and accuracy on bottle stayed within
   run-to-run noise (AUPRO 0.917-0.923 for 32/64/128 at coreset 0.01).
3. Nearest-neighbour search in the bank: exact, as matrix products inside the inference graph (which also
   holds the bank), or approximate with a faiss HNSW index for large banks (no exportable graph then). With
   ``precision="int8"`` the products by the bank run in int8 too (ONNX Runtime dynamic quantisation): the fp32
   product already runs at the CPU's peak, and it is most of the head's time.
4. Image score = the largest patch distance s*, re-weighted by how dense the bank is around its nearest bank
   feature m*: w = 1 - softmax(||m_test* - m||)[m*] over the ``num_neighbors`` bank neighbours of m*.
5. Anomaly map = patch distances upsampled to the input size and smoothed with a Gaussian (sigma 4).
"""

from __future__ import annotations

import logging
import time
from functools import cache
from numbers import Real

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, Interval, Options
from automl_ad.detectors.patch_based import PATCH_CONSTRAINTS, PatchFeatureDetector
from automl_ad.detectors.patchcore.graph import PatchCoreHead
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

_DISTANCE_VALUES = 1 << 24  # query-to-bank distances per graph run (64 MiB of float32)
_UNPROJECTED_DIM = 512  # features per patch assumed by the fit cost estimate when nothing projects them
# greedy coreset (see greedy_coreset): a step compares the new point with every point when more than this share
# may come nearer to it (measured break-even of gathering them on 2 cores: about a fifth), and then does so for
# this many steps before checking again; the bound's margin (relative to the largest squared norm) covers the
# float rounding of squared distances computed by the norm expansion
_SPARSE_SHARE, _DENSE_RUN, _BOUND_MARGIN = 0.2, 16, 1e-5


@register_detector
class PatchCore(PatchFeatureDetector):
    """Memory-bank route: nearest-neighbour distance of patch features to a coreset of normal patches."""

    name = "patchcore"
    route = "memory_bank"
    needs_training = False
    int8_head_products = True  # the nearest-neighbour product: 3.2 -> 1.0 ms on bottle (features/quantize.py)
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "coreset_ratio": 0.5}
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, **PATCH_CONSTRAINTS, "coreset_ratio": [Interval(Real, 0, 1, closed="right")],
        "coreset_projection_dim": [None, POSITIVE_INT], "num_neighbors": [POSITIVE_INT],
        "index": [Options("exact", "hnsw")], "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="wide_resnet50_2", feature_strides=(8, 16), weights=None, pretrained=True,
                 input_size=256, geometry=None, device="auto", cache_features=True, precision="fp32", neighbourhood=3,
                 embedding_dim=None, coreset_ratio=0.01, coreset_projection_dim=64, num_neighbors=9, index="exact",
                 smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        embedding = self._embedding().of(self._features(train))
        patches = embedding.reshape(-1, embedding.shape[-1])
        started = time.perf_counter()
        selected = greedy_coreset(patches, self.coreset_ratio, self.coreset_projection_dim, self.seed,
                                  self._fit_deadline)
        self.fit_extra_seconds_ = time.perf_counter() - started
        self.memory_bank_ = patches[selected].numpy().astype(np.float32)
        self.feature_shape_ = tuple(embedding.shape[1:3])
        asked = coreset_size(len(patches), self.coreset_ratio)
        self.fit_cut_by_time_ = len(selected) < asked
        log.log(logging.WARNING if self.fit_cut_by_time_ else logging.INFO,
                "%s: memory bank of %d patches (%.2f%% of %d)%s", self.name, len(selected),
                100 * len(selected) / len(patches), len(patches),
                f", cut at the fit's deadline (coreset_ratio {self.coreset_ratio:g} asks for {asked})"
                if self.fit_cut_by_time_ else "")

    @classmethod
    def extra_fit_seconds(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The greedy coreset: ratio x N steps, each a pass over the N training patches (one per cell of the finest
        feature stride) in its projected dimensions, at the seconds per value measured on this machine. An upper
        bound: on patches that cluster most steps compare far fewer (see :func:`greedy_coreset`)."""
        defaults = cls()
        ratio = float(params.get("coreset_ratio", defaults.coreset_ratio))
        dim = params.get("coreset_projection_dim", defaults.coreset_projection_dim) or \
            params.get("embedding_dim", defaults.embedding_dim) or _UNPROJECTED_DIM
        patches, _ = cls._training_patches(train_images, network_pixels, params)
        return min(1.0, ratio) * patches * patches * dim * _coreset_seconds_per_value(int(dim))

    # --- score ------------------------------------------------------------------------------------------------
    def _scoring_graph(self) -> PatchCoreHead:
        return PatchCoreHead(self._embedding(), self.memory_bank_, self.num_neighbors, self.input_size,
                             self.smoothing_sigma, index=self._hnsw_index() if self.index == "hnsw" else None)

    def _hnsw_index(self):
        import faiss

        index = faiss.IndexHNSWFlat(self.memory_bank_.shape[1], 32)
        index.hnsw.efSearch = 64
        index.add(self.memory_bank_)
        return index

    def _graph_batch_size(self) -> int:
        """Images per run such that the query-to-bank distances of a run hold about 2^24 values (64 MiB)."""
        patches = self.feature_shape_[0] * self.feature_shape_[1]
        return max(1, min(super()._graph_batch_size(), _DISTANCE_VALUES // (patches * len(self.memory_bank_))))

    def _graph_exportable(self) -> bool:
        return self.index == "exact"

    def graph_absent_reason(self) -> str:
        return (f"{self.name}: index={self.index!r} searches approximately; only the exact index has an "
                "equivalent graph")

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        return {"memory_bank": self.memory_bank_}, {"feature_shape": list(self.feature_shape_),
                                                     **self._backbone_state()}

    def _restore(self, tensors, state):
        self._check_backbone(state)
        self.memory_bank_ = tensors["memory_bank"]
        self.feature_shape_ = tuple(state["feature_shape"])


def coreset_size(count: int, ratio: float) -> int:
    """Patches a coreset of ``ratio`` keeps of ``count`` (at least one)."""
    return min(count, max(1, int(round(count * ratio))))


def greedy_coreset(features, ratio: float, projection_dim: int | None, seed: int = 0,
                   deadline: float | None = None) -> np.ndarray:
    """Indices of a greedy k-center coreset (each step adds the point farthest from those already chosen).

    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions when the features
    are wider; the squared-norm expansion makes each step one matrix-vector product. The selection is anytime:
    at ``deadline`` (``time.monotonic()``) it returns the points chosen so far, which are exactly the greedy
    coreset of that size (the steps cost ratio x N² in all, so on many patches, e.g. tiled large images, the
    configured ratio may not fit a trial's time).

    Each point remembers which chosen point is nearest to it (its owner, at distance r). A new point c can only
    come nearer to it than r when d(owner, c) < 2r (triangle inequality), so a step compares c with those points
    alone once they are few (under ``_SPARSE_SHARE`` of all: gathering them costs more per point than the
    contiguous product); the selection is the same as comparing with every point. On object images, whose patches
    cluster, most steps are sparse (bottle: 3x faster at ratio 0.01 and 0.1, ball_screw 1.6x); on textures few are
    (magnetic_tile: within 2% of comparing with every point).
    """
    import torch

    count = len(features)
    target = coreset_size(count, ratio)
    if target >= count:
        return np.arange(count)
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if projection_dim and points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        points = points @ projection
    norms = (points * points).sum(dim=1)
    selected = np.empty(target, dtype=np.int64)
    chosen = torch.empty(target, points.shape[1])
    current = int(torch.randint(count, (1,), generator=generator))
    min_distance = torch.full((count,), float("inf"))  # squared distance to the nearest chosen point
    owner = torch.zeros(count, dtype=torch.int32)  # which chosen point that is (its step)
    dense_until = 1  # steps before this one compare with every point
    margin = _BOUND_MARGIN * float(norms.max())
    with torch.inference_mode():
        for i in range(target):
            selected[i] = current
            if deadline is not None and time.monotonic() > deadline:
                return selected[:i + 1]
            centre = chosen[i] = points[current]
            if i >= dense_until:
                reach = ((chosen[:i] - centre) ** 2).sum(dim=1)  # squared distance from c to each owner
                candidates = torch.nonzero(reach[owner] < 4 * (min_distance + margin)).squeeze(1)
                if len(candidates) > _SPARSE_SHARE * count:
                    dense_until = i + _DENSE_RUN
            if i < dense_until:
                distance = norms - 2 * (points @ centre) + norms[current]
                owner.masked_fill_(distance < min_distance, i)
                torch.minimum(min_distance, distance, out=min_distance)
            else:
                distance = norms[candidates] - 2 * (points[candidates] @ centre) + norms[current]
                closer = distance < min_distance[candidates]
                moved = candidates[closer]
                min_distance[moved] = distance[closer]
                owner[moved] = i
            current = int(torch.argmax(min_distance))
    return selected


@cache
def _coreset_seconds_per_value(dim: int) -> float:
    """Seconds one greedy coreset step spends per (patch x dimension), timed on random patches of ``dim``
    dimensions large enough to leave the caches (each step is a memory-bound matrix-vector product)."""
    import torch

    count, steps = 1 << 18, 16
    points = torch.randn(count, dim)
    greedy_coreset(points, 2 / count, None)  # warm-up
    started = time.perf_counter()
    greedy_coreset(points, steps / count, None)
    return (time.perf_counter() - started) / (steps * count * dim)
