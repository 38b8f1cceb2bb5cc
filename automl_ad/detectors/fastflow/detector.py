"""FastFlow (Yu et al., 2021): 2-D normalising flows that map normal patch features to a standard Gaussian.

1. Features of the frozen backbone at ``feature_strides`` (default 4, 8 and 16: the first three stages), each
   stage normalised by a LayerNorm over (C, h, w) before its flow, as in the paper; as in the official code
   its element-wise affine parameters are trained with the flow (``norm_affine``). That affine is not part of
   the flow's Jacobian, so shrinking it concentrates the flow's input and lowers the NLL without limit: the loss
   keeps falling. ``norm_affine=False`` normalises without learned parameters, and the loss levels off.
2. One 2-D flow per stage (FrEIA ``SequenceINN`` of ``flow_steps`` ``AllInOneBlock`` s: affine coupling with
   soft clamping ``affine_clamping``, ActNorm-style global affine, fixed channel permutation). The coupling
   subnets are two convolutions with a ReLU between, alternating 3x3 and 1x1 kernels (``conv3x3_only`` uses
   3x3 everywhere), ``hidden_ratio`` x the input channels wide.
3. Training maximises the likelihood: per image 0.5 * sum(z^2) - log|det J|, averaged over the batch and summed
   over stages (the official objective), with Adam. Because the backbone is frozen, the features are extracted
   (and cached) once and the flows train on them for ``epochs`` epochs. The reported ``loss`` is that objective
   divided by the number of feature positions of all stages (NLL per position).
4. Anomaly map as the official code: per stage the likelihood map exp(-0.5 * mean_c(z^2)), upsampled
   (bilinear) to the input size, averaged over stages; the official map is its negation, we report
   1 - average likelihood (the same ranking, in [0, 1], higher = more anomalous). Image score = the map's
   maximum. No smoothing by default, as the official code (``smoothing_sigma`` > 0 adds a Gaussian blur).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.fastflow.graph import FastFlowHead, flow_outputs
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.graph_based import BackboneGraphDetector
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

#: Bytes a flow step's training keeps per feature value of a batch (about six float32 per coupling step; the
#: subnet's width does not matter): measured 19-24 with
#: MobileNetV2 at 512 px (1 -> 8 and 8 -> 32 images per batch; 4 -> 8 steps; hidden_ratio 0.16 and 1.0 alike).
FLOW_STEP_BYTES = 24


@register_detector
class FastFlow(BackboneGraphDetector):
    """Distribution-map route: per-stage normalising flows on frozen backbone features, likelihood maps."""

    name = "fastflow"
    route = "distribution_map"
    iterative = True
    runs_in_parts = True
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "flow_steps": 4, "epochs": 15,
                   "batch_size": 8}
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, "flow_steps": [POSITIVE_INT], "hidden_ratio": [POSITIVE], "conv3x3_only": [bool],
        "affine_clamping": [POSITIVE], "norm_affine": [bool], "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT],
        "learning_rate": [POSITIVE], "weight_decay": [NON_NEGATIVE], "smoothing_sigma": [NON_NEGATIVE],
        "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(4, 8, 16), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", flow_steps=8, hidden_ratio=1.0,
                 conv3x3_only=False, affine_clamping=2.0, norm_affine=True, epochs=100, batch_size=32,
                 learning_rate=1e-3, weight_decay=1e-5, smoothing_sigma=0.0, seed=0):
        self._store_parameters(locals())

    # --- model ------------------------------------------------------------------------------------------------
    def _build(self, shapes: list[tuple[int, int, int]]):
        """LayerNorms and flows for feature maps of ``shapes`` (C, h, w); weights initialised from ``seed``."""
        import torch

        state = np.random.get_state()  # FrEIA draws the fixed permutations from numpy's global generator
        try:
            np.random.seed(self.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = _model(shapes, int(self.flow_steps), float(self.hidden_ratio), bool(self.conv3x3_only),
                               float(self.affine_clamping), bool(self.norm_affine))
        finally:
            np.random.set_state(state)
        return model.to(self._extractor().device)

    # --- fit --------------------------------------------------------------------------------------------------
    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The training set (inputs and features, held through the fit) and a batch through the flows
        (``FLOW_STEP_BYTES`` per feature value and step): the default's 32 images per batch at 1024 px need about
        15 GB with MobileNetV2."""
        features = cls._feature_values(params)
        if features is None:
            return 0.0
        steps = int(params.get("flow_steps", cls().flow_steps))
        return cls._training_set_bytes(train_images, network_pixels, params) + \
            FLOW_STEP_BYTES * steps * features * cls._batch_pixels(train_images, network_pixels, params)

    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        features = [torch.from_numpy(f) for f in self._features(train)]
        self.feature_shapes_ = [tuple(int(s) for s in f.shape[1:]) for f in features]
        model = self._build(self.feature_shapes_)
        device = next(model.parameters()).device
        positions = sum(h * w for _, h, w in self.feature_shapes_)
        optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.learning_rate,
                                     weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        count = len(features[0])
        model.train()
        for epoch in range(int(self.epochs)):
            order = torch.randperm(count, generator=generator)
            total, seen = 0.0, 0
            for start in self._until_deadline(range(0, count, int(self.batch_size))):
                index = order[start:start + int(self.batch_size)]
                outputs = flow_outputs(model, [f[index].to(device) for f in features])
                loss = sum(torch.mean(0.5 * z.pow(2).sum(dim=(1, 2, 3)) - log_det) for z, log_det in outputs)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
                seen += len(index)
            mean_loss = total / seen / positions
            if self._record_epoch(epoch, mean_loss, on_epoch, "lower learning_rate or affine_clamping",
                                  interim=lambda: self._interim_state([model], model_=model)):
                break
        self.model_ = model.eval()
        log.info("%s: %d epochs, final NLL per position %.4f", self.name, len(self.loss_history_),
                 self.loss_history_[-1])

    # --- score ------------------------------------------------------------------------------------------------
    def _scoring_graph(self) -> FastFlowHead:
        return FastFlowHead(self.model_, self.input_size, self.smoothing_sigma)

    def _concurrent_parts(self, graph, example):
        """The backbone, then its stages' flows in two groups side by side, then the scores."""
        return graph.backbone, *graph.head.parts([math.prod(shape) for shape in self.feature_shapes_])

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}
        return tensors, {"feature_shapes": [list(s) for s in self.feature_shapes_], **self._backbone_state()}

    def _restore(self, tensors, state):
        import torch

        self._check_backbone(state)
        self.feature_shapes_ = [tuple(s) for s in state["feature_shapes"]]
        model = self._build(self.feature_shapes_)
        device = next(model.parameters()).device
        model.load_state_dict({k: torch.from_numpy(v).to(device) for k, v in tensors.items()})
        self.model_ = model.eval()


def _subnet(kernel_size: int, hidden_ratio: float):
    """FrEIA subnet constructor: conv(k) -> ReLU -> conv(k), 'same' padding."""
    from torch import nn

    def build(in_channels: int, out_channels: int):
        hidden = max(1, int(in_channels * hidden_ratio))
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))

    return build


def _flow(shape: tuple[int, int, int], steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float):
    """One FastFlow flow: ``steps`` AllInOneBlocks, 3x3 subnets on even steps and 1x1 on odd ones."""
    from FrEIA.framework import SequenceINN
    from FrEIA.modules import AllInOneBlock

    flow = SequenceINN(*shape)
    for step in range(steps):
        kernel = 1 if step % 2 == 1 and not conv3x3_only else 3
        flow.append(AllInOneBlock, subnet_constructor=_subnet(kernel, hidden_ratio), affine_clamping=clamp,
                    permute_soft=False)
    return flow


def _model(shapes, steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float, norm_affine: bool):
    """Trainable part: a LayerNorm over (C, h, w) and a flow per stage."""
    from torch import nn

    return nn.ModuleDict({
        "norms": nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=norm_affine) for shape in shapes),
        "flows": nn.ModuleList(_flow(tuple(shape), steps, hidden_ratio, conv3x3_only, clamp) for shape in shapes)})

