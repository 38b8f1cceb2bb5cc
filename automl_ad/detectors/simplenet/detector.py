"""SimpleNet (Liu et al., CVPR 2023): a discriminator separates adapted normal patch features from noisy ones.

1. Feature extractor: the frozen pretrained backbone's locally aware patch features, as PatchCore's (stages at
   ``feature_strides``, each averaged over its ``neighbourhood``, concatenated on the finest grid, optionally
   pooled to ``embedding_dim`` channels; the same embedding, ``patch_based.py``). They are extracted once
   through the feature cache, so training runs on cached features. The paper uses WideResNet50 layers 2 and 3
   pooled to 1536 channels; the default here is ResNet18 (384 channels) for CPU budgets.
2. Feature adaptor: one linear layer (same width, Xavier-normal weights), as the official ``pre_proj=1``.
3. Anomalous features: adapted normal features plus i.i.d. Gaussian noise whose standard deviation is
   ``noise_std`` times the training embedding's channel standard deviation (the root mean square over channels,
   ``feature_std_``). The paper gives an absolute 0.015 for its WideResNet50 embedding; an absolute scale suits
   one backbone only: the shared MobileNetV2's mid-level features have a channel standard deviation of about
   2.6, and with 0.015 (or 0.1) the discriminator cannot separate the two within a few epochs (the loss stays
   at 1). Relative to the features, one default carries over to other backbones and feature scales: 0.35,
   the middle of a plateau seen on three datasets with MobileNetV2 (validation AUROC / AUPRO within 0.01 / 0.04
   from 0.35 to 0.5; at 0.15 AUPRO fell by 0.05-0.15; ``benchmarks/families.py`` notes).
4. Discriminator: Linear -> BatchNorm -> LeakyReLU(0.2) -> Linear (no bias) to one score, ``hidden_dim`` wide.
5. Truncated L1 loss: mean(max(0, th - D(normal))) + mean(max(0, th + D(anomalous))) with th = ``margin``.
   Adaptor and discriminator train jointly on all patches of ``batch_size`` images per step: the adaptor with
   AdamW (``adaptor_learning_rate``, AdamW's default weight decay), the discriminator with Adam
   (``learning_rate``, weight decay 1e-5), as the official code. The official code keeps the epoch with the best
   *test* AUROC; without test labels during fit, the last epoch is kept.
6. Anomaly map: -D(adapted feature) per patch, upsampled (bilinear) to the input size and smoothed with a
   Gaussian (sigma ``smoothing_sigma``); image score = the map's maximum.
"""

from __future__ import annotations

import logging

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from automl_ad.detectors.patch_based import PATCH_CONSTRAINTS, PatchScoreDetector
from automl_ad.detectors.registry import register_detector
from automl_ad.detectors.simplenet.graph import NegatedDiscriminator

log = logging.getLogger(__name__)

_DISCRIMINATOR_WEIGHT_DECAY = 1e-5  # official code
#: float32 values a training step keeps per patch row (a batch's patches, normal and noisy) for the backward pass:
#: the adapted feature, the noise and the noisy feature (3 x the embedding's width), and the discriminator's hidden
#: layer before and after BatchNorm and LeakyReLU with its gradient (4 x ``hidden_dim``)
_ROW_VALUES_PER_DIM, _ROW_VALUES_PER_HIDDEN = 3, 4


@register_detector
class SimpleNet(PatchScoreDetector):
    """Self-supervised route: adapted patch features, synthetic anomalies by feature noise, an MLP discriminator."""

    name = "simplenet"
    route = "self_supervised"
    iterative = True
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "epochs": 8, "hidden_dim": 256,
                   "batch_size": 2}
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, **PATCH_CONSTRAINTS, "hidden_dim": [POSITIVE_INT], "noise_std": [POSITIVE],
        "margin": [POSITIVE], "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT], "learning_rate": [POSITIVE],
        "adaptor_learning_rate": [POSITIVE], "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(8, 16), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", neighbourhood=3,
                 embedding_dim=None, hidden_dim=1024, noise_std=0.35, margin=0.5, epochs=160, batch_size=8,
                 learning_rate=2e-4, adaptor_learning_rate=1e-4, smoothing_sigma=4.0, seed=0):
        self._store_parameters(locals())

    # --- model ------------------------------------------------------------------------------------------------
    def _build(self, dim: int):
        """Adaptor and discriminator for ``dim``-wide features, initialised from ``seed``."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = simplenet_model(dim, int(self.hidden_dim))
        return model.to(self._extractor().device)

    # --- fit --------------------------------------------------------------------------------------------------
    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The training patches' embeddings (as PatchCore's) and a step's rows: every patch of ``batch_size``
        network inputs, normal and noisy (``_ROW_VALUES_PER_DIM`` and ``_ROW_VALUES_PER_HIDDEN``): the default's 8
        inputs of 512 px hold 65,536 rows of about 17 KB, 1.1 GB."""
        strides, _ = cls._channels_of(params)
        _, dim = cls._training_patches(train_images, network_pixels, params)
        rows = 2 * cls._batch_pixels(train_images, network_pixels, params) / min(strides) ** 2
        hidden = int(params.get("hidden_dim", cls().hidden_dim))
        return super().peak_memory_bytes(train_images, network_pixels, params) + \
            4.0 * rows * (_ROW_VALUES_PER_DIM * dim + _ROW_VALUES_PER_HIDDEN * hidden)

    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        features, self.feature_shape_ = self._patch_grids(train)
        flat = features.reshape(-1, features.shape[-1])
        self.feature_std_ = float(flat.var(dim=0).mean().sqrt())
        noise_std = float(self.noise_std) * self.feature_std_
        model = self._build(features.shape[-1])
        adaptor_optimiser = torch.optim.AdamW(model["adaptor"].parameters(), lr=self.adaptor_learning_rate)
        discriminator_optimiser = torch.optim.Adam(model["discriminator"].parameters(), lr=self.learning_rate,
                                                   weight_decay=_DISCRIMINATOR_WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(self.seed)
        count, batch_size = len(features), int(self.batch_size)
        model.train()
        for epoch in range(int(self.epochs)):
            order = torch.randperm(count, generator=generator)
            total, seen = 0.0, 0
            for start in self._until_deadline(range(0, count, batch_size)):
                index = order[start:start + batch_size].to(features.device)
                normal = model["adaptor"](features[index].reshape(-1, features.shape[-1]))
                noise = torch.randn(normal.shape, generator=generator).to(normal.device) * noise_std
                loss = truncated_l1_loss(model["discriminator"](torch.cat([normal, normal + noise])).squeeze(1),
                                         len(normal), float(self.margin))
                adaptor_optimiser.zero_grad(set_to_none=True)
                discriminator_optimiser.zero_grad(set_to_none=True)
                loss.backward()
                adaptor_optimiser.step()
                discriminator_optimiser.step()
                total += float(loss.detach()) * len(index)
                seen += len(index)
            if self._record_epoch(epoch, total / seen, on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim_state([model], model_=model)):
                break
        self.model_ = model.eval()
        log.info("%s: %d epochs, final loss %.5f", self.name, len(self.loss_history_), self.loss_history_[-1])

    # --- score ------------------------------------------------------------------------------------------------
    def _patch_score(self) -> NegatedDiscriminator:
        return NegatedDiscriminator(self.model_)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}
        return tensors, {"feature_shape": list(self.feature_shape_), "feature_std": self.feature_std_,
                         **self._backbone_state()}

    def _restore(self, tensors, state):
        import torch

        self._check_backbone(state)
        model = self._build(int(tensors["adaptor.weight"].shape[1]))
        device = next(model.parameters()).device
        model.load_state_dict({k: torch.from_numpy(v).to(device) for k, v in tensors.items()})
        self.model_ = model.eval()
        self.feature_shape_ = tuple(state["feature_shape"])
        self.feature_std_ = state.get("feature_std")  # None in models saved before it was recorded


def simplenet_model(dim: int, hidden_dim: int):
    """{"adaptor": Linear(dim, dim), "discriminator": Linear -> BatchNorm -> LeakyReLU(0.2) -> Linear(no bias)},
    linear weights Xavier-normal as the official code."""
    from torch import nn

    model = nn.ModuleDict({
        "adaptor": nn.Linear(dim, dim),
        "discriminator": nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.2),
                                       nn.Linear(hidden_dim, 1, bias=False))})
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
    return model


def truncated_l1_loss(scores, n_normal: int, margin: float):
    """SimpleNet's loss on discriminator scores: the first ``n_normal`` are normal (pushed above ``margin``), the
    rest anomalous (pushed below ``-margin``); both terms are zero once past the margin."""
    import torch

    return torch.clamp(margin - scores[:n_normal], min=0).mean() + torch.clamp(scores[n_normal:] + margin, min=0).mean()
