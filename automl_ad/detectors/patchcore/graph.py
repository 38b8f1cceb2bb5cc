"""PatchCore's scoring head: patch features, nearest neighbours in the memory bank, re-weighted image score and
the smoothed distance map."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from automl_ad.detectors.blocks import PatchEmbedding, UpsampleSmooth


class PatchCoreHead(nn.Module):
    """Feature maps -> (image scores, maps). Nearest neighbours in the bank (a constant) are exact, by the
    squared-norm expansion as faiss' ``IndexFlatL2`` (a plain graph; ``precision="int8"`` quantises its products by
    the bank), or come from an approximate faiss ``index`` (then the head runs in eager torch only)."""

    def __init__(self, embed: PatchEmbedding, bank: np.ndarray, num_neighbors: int, size: int, sigma: float,
                 index=None):
        super().__init__()
        self.embed, self.index = embed, index
        self.register_buffer("bank", torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)))
        self.register_buffer("bank_norms", self.bank.pow(2).sum(dim=1))
        self.k = min(int(num_neighbors), len(bank)) if num_neighbors > 1 and len(bank) > 1 else 1
        self.smooth = UpsampleSmooth(size, sigma)

    def forward(self, *features):
        embedding = self.embed(*features)
        _, h, w, d = embedding.shape
        queries = embedding.reshape(-1, h * w, d)
        distances = self._nearest_distances(queries)  # (N, h*w)
        worst = distances.argmax(dim=1, keepdim=True)
        star = distances.gather(1, worst)[:, 0]
        scores = star if self.k == 1 else self._reweight(queries, star, worst)
        return scores, self.smooth(distances.reshape(-1, h, w))

    def _squared_distances(self, queries):
        """(..., D) queries -> (..., M) squared L2 distances to every bank feature."""
        return queries.pow(2).sum(dim=-1, keepdim=True) - 2 * queries @ self.bank.T + self.bank_norms

    def _nearest_distances(self, queries):
        """(N, P, D) queries -> (N, P) distances to their nearest bank feature. Exact: the minimum of
        ``|m|^2 - 2 q.m`` over the bank m (one matrix product with the norms as its bias), plus ``|q|^2``."""
        if self.index is not None:
            found, _ = self.index.search(queries.reshape(-1, queries.shape[-1]).cpu().numpy(), 1)
            squared = torch.from_numpy(found[:, 0]).reshape(queries.shape[:2]).to(queries.device)
        else:  # a product by the constant bank, so that int8 packages can quantise it (quantise_products)
            partial = (queries.reshape(-1, queries.shape[-1]) * -2) @ self.bank.T + self.bank_norms
            squared = partial.min(dim=1).values.reshape(queries.shape[:2]) + queries.pow(2).sum(dim=-1)
        return squared.clamp(min=0).sqrt()

    def _nearest_index(self, points):
        """(N, D) points -> (N,) index of their nearest bank feature."""
        if self.index is not None:
            return torch.from_numpy(self.index.search(points.cpu().numpy(), 1)[1][:, 0]).to(points.device)
        return self._squared_distances(points).argmin(dim=1)

    def _neighbours(self, points):
        """(N, D) bank features -> indices (N, k) of their ``k`` nearest bank features (themselves first)."""
        if self.index is None:
            return self._squared_distances(points).topk(self.k, dim=1, largest=False).indices
        return torch.from_numpy(self.index.search(points.cpu().numpy(), self.k)[1]).to(points.device)

    def _reweight(self, queries, star, worst):
        """The paper's image score: s* x (1 - softmax weight of m* among its ``k`` bank neighbours), m* being the
        nearest bank feature of the worst patch."""
        test_point = queries.gather(1, worst[:, :, None].expand(-1, -1, queries.shape[-1]))  # (N, 1, D)
        support = self._neighbours(self.bank[self._nearest_index(test_point[:, 0])])  # m* first
        support_distances = (self.bank[support] - test_point).pow(2).sum(dim=2).sqrt()
        support_distances = torch.cat([star[:, None], support_distances[:, 1:]], dim=1)  # the distance to m*
        return (1 - support_distances.softmax(dim=1)[:, 0]) * star
