"""Deep SVDD (Ruff et al., ICML 2018) on locally aware patch features of a frozen pretrained backbone.

1. Patch features as PatchCore's (stages at ``feature_strides``, each averaged over its ``neighbourhood`` and
   concatenated on the finest grid; the same embedding, ``patch_based.py``), extracted once through the
   feature cache. Every grid position of every training image is one sample.
2. Network phi: bias-free linear layers (``hidden_dims`` then ``rep_dim``), each hidden one followed by a
   BatchNorm without affine parameters and a leaky ReLU, as the paper prescribes against hypersphere collapse
   (a bias or a bounded activation would let phi map every input to the centre).
3. Centre c: the mean of phi's outputs on all training patches before training, coordinates closer to zero
   than ``centre_eps`` moved to +-``centre_eps`` (the paper's fix: a zero coordinate could be matched by zero
   weights). The paper pretrains phi as an autoencoder's encoder first; here the input is already a pretrained
   representation, so phi starts from a seeded random initialisation and its BatchNorm statistics are estimated
   on the training patches before c is computed (in evaluation mode, as the paper's code does).
4. Objective, minimised with Adam (``weight_decay`` is the paper's lambda):
   ``one-class``: mean ||phi(x) - c||^2; ``soft-boundary``: R^2 + 1/nu * mean(max(0, ||phi(x) - c||^2 - R^2)),
   R set after every batch from ``warm_up_epochs`` on to the (1 - nu)-quantile of the batch distances (the
   official code), and once more after training to that quantile over all training patches with phi in
   evaluation mode (BatchNorm running statistics), the network that scores.
   The paper decays the learning rate once (x0.1 at a milestone); we keep it constant.
5. Anomaly map: ||phi(x) - c||^2 per patch (minus R^2 for soft-boundary), upsampled (bilinear) to the input
   size and smoothed with a Gaussian (``smoothing_sigma``); image score = the map's maximum.
"""

from __future__ import annotations

import logging
from numbers import Real

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.deep_svdd.graph import SvddDistance
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.parameters import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    TupleOf,
)
from automl_ad.detectors.patch_based import PATCH_CONSTRAINTS, PatchScoreDetector, run_on_patches
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

OBJECTIVES = ("one-class", "soft-boundary")


@register_detector
class DeepSVDD(PatchScoreDetector):
    """One-class route: patch features mapped into a minimal hypersphere; the distance to its centre is the
    anomaly score."""

    name = "deep_svdd"
    route = "one_class"
    iterative = True
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "epochs": 5, "batch_size": 256,
                   "learning_rate": 1e-3}
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, **PATCH_CONSTRAINTS, "hidden_dims": [TupleOf(POSITIVE_INT, min_length=0)],
        "rep_dim": [POSITIVE_INT], "objective": [Options(*OBJECTIVES)], "nu": [Interval(Real, 0, 1, closed="right")],
        "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT], "learning_rate": [POSITIVE],
        "weight_decay": [NON_NEGATIVE], "warm_up_epochs": [NON_NEGATIVE_INT], "centre_eps": [POSITIVE],
        "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(8, 16), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", neighbourhood=3,
                 embedding_dim=None, hidden_dims=(256,), rep_dim=64, objective="one-class", nu=0.1, epochs=30,
                 batch_size=1024, learning_rate=1e-4, weight_decay=1e-6, warm_up_epochs=10, centre_eps=0.1,
                 smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- network ----------------------------------------------------------------------------------------------
    def _build(self, in_dim: int):
        """phi for ``in_dim``-wide patch features, initialised from ``seed``, on the backbone's device."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = svdd_network(in_dim, tuple(int(h) for h in self.hidden_dims), int(self.rep_dim))
        return network.to(self._extractor().device)

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        grids, self.feature_shape_ = self._patch_grids(train)
        patches = grids.reshape(-1, grids.shape[-1])
        network = self._build(patches.shape[1])
        batch_size = int(self.batch_size)
        _estimate_batchnorm(network, patches, batch_size)
        self.centre_ = initial_centre(network, patches, float(self.centre_eps), batch_size)
        distance_to_centre = SvddDistance(network, self.centre_, 0.0)
        radius = torch.zeros((), device=patches.device)
        optimiser = torch.optim.Adam(network.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        soft = self.objective == "soft-boundary"
        for epoch in range(int(self.epochs)):
            network.train()
            order = torch.randperm(len(patches), generator=generator).to(patches.device)
            total, seen = 0.0, 0
            for start in self._until_deadline(range(0, len(patches), batch_size)):
                batch = patches[order[start:start + batch_size]]
                if len(batch) < 2:  # BatchNorm needs two samples; a single leftover patch is skipped
                    continue
                distance = distance_to_centre(batch)
                if soft:
                    loss = radius ** 2 + torch.relu(distance - radius ** 2).mean() / self.nu
                else:
                    loss = distance.mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if soft and epoch >= self.warm_up_epochs:
                    radius = torch.quantile(distance.detach().sqrt(), 1 - self.nu)
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            if self._record_epoch(epoch, total / max(seen, 1), on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim_state([network], network_=network, radius_=0.0)):
                break
        self.network_ = network.eval()
        self.radius_ = 0.0
        if soft:  # the final radius: the (1 - nu)-quantile over all training patches, as phi is used to score
            self.radius_ = float(torch.quantile(run_on_patches(distance_to_centre, patches).sqrt(), 1 - self.nu))
        log.info("%s: %d epochs on %d patches, final loss %.5f", self.name, len(self.loss_history_), len(patches),
                 self.loss_history_[-1])

    # --- score ------------------------------------------------------------------------------------------------
    def _patch_score(self) -> SvddDistance:
        """||phi(x) - c||^2, minus R^2 for the soft-boundary objective."""
        offset = self.radius_ ** 2 if self.objective == "soft-boundary" else 0.0
        return SvddDistance(self.network_, self.centre_, offset)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {f"network.{k}": v.detach().cpu().numpy() for k, v in self.network_.state_dict().items()}
        tensors["centre"] = self.centre_.detach().cpu().numpy()
        return tensors, {"radius": self.radius_, "feature_shape": list(self.feature_shape_), **self._backbone_state()}

    def _restore(self, tensors, state):
        import torch

        self._check_backbone(state)
        weights = {k.removeprefix("network."): torch.from_numpy(v) for k, v in tensors.items()
                   if k.startswith("network.")}
        network = self._build(int(weights["0.weight"].shape[1]))
        network.load_state_dict(weights)
        self.network_ = network.eval()
        self.centre_ = torch.from_numpy(tensors["centre"]).to(self._extractor().device)
        self.radius_ = float(state["radius"])
        self.feature_shape_ = tuple(state["feature_shape"])


def svdd_network(in_dim: int, hidden_dims: tuple[int, ...], rep_dim: int):
    """Bias-free MLP: [Linear(no bias) -> BatchNorm(no affine) -> LeakyReLU] per hidden width, Linear(no bias)."""
    from torch import nn

    layers, width = [], in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden, eps=1e-4, affine=False),
                   nn.LeakyReLU()]
        width = hidden
    layers.append(nn.Linear(width, rep_dim, bias=False))
    return nn.Sequential(*layers)


def _estimate_batchnorm(network, patches, batch_size: int) -> None:
    """BatchNorm running statistics as the plain average over all training patches (no gradient)."""
    import torch
    from torch import nn

    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm1d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    network.train()
    with torch.no_grad():
        for batch in patches.split(batch_size):
            if len(batch) > 1:
                network(batch)
    for norm in norms:
        norm.momentum = 0.1


def initial_centre(network, patches, eps: float, batch_size: int):
    """Mean output of ``network`` (evaluation mode) on ``patches``; coordinates with |c_j| < eps set to
    +-eps (sign kept, zero to +eps) so no coordinate can be matched by zero weights."""
    import torch

    network.eval()
    with torch.no_grad():
        total = sum(network(batch).sum(dim=0) for batch in patches.split(batch_size))
    centre = total / len(patches)
    small = centre.abs() < eps
    centre[small] = torch.where(centre[small] < 0, -eps, eps)
    return centre
