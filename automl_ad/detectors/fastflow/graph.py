"""FastFlow's scoring head: per-stage flows, 1 - mean over stages of the upsampled likelihood exp(-0.5 mean_c z^2),
optionally smoothed; image score = the map's maximum.

The trained flows are FrEIA ``AllInOneBlock`` s. The head runs each block in an equivalent inference form,
:class:`CouplingStep`, with the constant arithmetic folded into the convolutions: per block one split, the subnet's two
convolutions (the last one computing the log-scale and shift halves together), the affine coupling and one
channel gather, where FrEIA's forward also slices the subnet output,
scales it, applies the global affine to every channel and permutes them with a 1x1 convolution. Measured through ONNX
Runtime on 2 cores, MobileNetV2 at 256 px, 8 steps x 3 stages, batch 1: the whole graph 19.4-20.7 -> 16.6-16.7 ms,
the backbone alone 7.7-8.3 ms; one convolution instead of two for the log-scale and the shift took the whole graph
from 2.50-2.56x to 2.32-2.39x the bare backbone session (median of per-call ratios, 100 alternating calls)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from automl_ad.detectors.blocks import MapHead, UpsampleSmooth


def flow_outputs(model: nn.Module, features) -> list:
    """[(z, log|det J|)] per stage for per-stage feature batches (each stage: its LayerNorm, then its flow)."""
    return [flow(norm(feature)) for feature, norm, flow in zip(features, model["norms"], model["flows"])]


class CouplingStep(nn.Module):
    """A FrEIA ``AllInOneBlock`` (affine coupling with a conv-ReLU-conv subnet, global affine, fixed permutation) in
    inference form: ``x1, x2 = split(x)``; ``h = subnet's first half (x1)``; ``y2 = x2 * g2 exp(c tanh(S h)) + T h``
    with the 0.1 factor, the global scale ``g2`` and offset in ``S`` and ``T``; ``y1 = g1 x1 + o1``; then the
    permutation as a channel gather (``permute=False`` leaves it out, as for the last block, whose output is only
    averaged over channels). The same outputs as the block's forward, without its log-Jacobian."""

    def __init__(self, block: nn.Module, permute: bool = True):
        super().__init__()
        if block.householder or block.reverse_pre_permute or block.GIN or block.conditional or \
                not isinstance(block.subnet, nn.Sequential) or len(block.subnet) != 3:
            raise ValueError("CouplingStep covers AllInOneBlocks with a conv-ReLU-conv subnet and a fixed permutation")
        first, last = block.subnet[0], block.subnet[2]
        c1, c2 = block.splits
        with torch.no_grad():
            scale = block.global_scale_activation(block.global_scale).reshape(-1)
            offset = block.global_offset.reshape(-1)
            weight, bias = 0.1 * last.weight, 0.1 * last.bias
            self.first = _conv(first.weight, first.bias, first.padding)
            g2 = scale[c1:]
            # one convolution for the log-scale and the shift halves (as the block's own): one pass over h
            self.last = _conv(torch.cat([weight[:c2], weight[c2:] * g2[:, None, None, None]]),
                              torch.cat([bias[:c2], bias[c2:] * g2 + offset[c1:]]), last.padding)
            self.register_buffer("g1", scale[:c1].reshape(1, -1, 1, 1).clone())
            self.register_buffer("o1", offset[:c1].reshape(1, -1, 1, 1).clone())
            self.register_buffer("g2", g2.reshape(1, -1, 1, 1).clone())
            # conv2d(x, w_perm): output channel i is input channel argmax_j w_perm[i, j]
            self.register_buffer("order", block.w_perm.reshape(c1 + c2, c1 + c2).argmax(dim=1) if permute else None)
        self.splits, self.clamp = (c1, c2), float(block.clamp)

    def forward(self, x):
        x1, x2 = x.split(self.splits, dim=1)
        log_scale, shift = self.last(F.relu(self.first(x1))).split(self.splits[1], dim=1)
        y2 = x2 * (torch.exp(self.clamp * torch.tanh(log_scale)) * self.g2) + shift
        y = torch.cat([x1 * self.g1 + self.o1, y2], dim=1)
        return y if self.order is None else y.index_select(1, self.order)


def _conv(weight, bias, padding) -> nn.Conv2d:
    """A frozen Conv2d holding copies of ``weight`` and ``bias`` (padding as the original's: 'same' or a tuple)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), padding=padding)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv.requires_grad_(False)


def inference_flow(flow: nn.Module) -> nn.Sequential:
    """A trained FrEIA ``SequenceINN`` of AllInOneBlocks as :class:`CouplingStep` s (the last one unpermuted)."""
    blocks = list(flow.module_list)
    return nn.Sequential(*(CouplingStep(b, permute=i < len(blocks) - 1) for i, b in enumerate(blocks)))


class StageLikelihoods(nn.Module):
    """(*every stage's feature maps) -> the sum over ``stages`` of their upsampled (and smoothed) likelihood maps
    exp(-0.5 mean_c z^2), (N, size, size)."""

    def __init__(self, norms: nn.ModuleList, flows: nn.ModuleList, smooth: nn.Module, stages: list[int]):
        super().__init__()
        self.norms, self.flows, self.smooth, self.stages = norms, flows, smooth, list(stages)

    def forward(self, *features):
        return sum(self.smooth(torch.exp(-0.5 * self.flows[i](self.norms[i](features[i])).pow(2).mean(dim=1)))
                   for i in self.stages)


class LikelihoodScores(nn.Module):
    """(summed likelihood maps of ``stages`` stages, in one or more parts) -> (image scores, 1 - their mean)."""

    def __init__(self, stages: int):
        super().__init__()
        self.stages, self.head = stages, MapHead()

    def forward(self, *likelihoods):
        return self.head(1 - sum(likelihoods) / self.stages)


class FastFlowHead(nn.Module):
    """Feature maps -> (image scores, maps) through the trained ``model`` (LayerNorms and flows, the flows in
    inference form). Upsampling and smoothing are linear and keep constants, so each stage's small likelihood map
    is upsampled and smoothed in one step (:class:`UpsampleSmooth`) before the mean, rather than the full-size
    mean smoothed afterwards. :meth:`parts` splits the stages in two for running side by side."""

    def __init__(self, model: nn.Module, size: int, sigma: float):
        super().__init__()
        self.size = int(size)
        flows = nn.ModuleList(inference_flow(flow) for flow in model["flows"])
        self.likelihoods = StageLikelihoods(model["norms"], flows, UpsampleSmooth(size, sigma), range(len(flows)))
        self.scores = LikelihoodScores(len(flows))

    def forward(self, *features):
        return self.scores(self.likelihoods(*features))

    def parts(self, values: list[int]) -> tuple[list[nn.Module], nn.Module]:
        """Two groups of stages of about equal work, from each stage's feature ``values`` per image (a flow's time
        goes with them, positions x channels: measured 3.9, 1.3 and 1.6 ms for MobileNetV2's 64²x24, 32²x32 and
        16²x96 at batch 1), the largest stages first, and the scores of their two sums."""
        likelihoods = self.likelihoods
        groups: list[list[int]] = [[], []]
        work = [0, 0]
        for i in sorted(range(len(values)), key=lambda i: -values[i]):
            lighter = int(work[1] < work[0])
            groups[lighter].append(i)
            work[lighter] += values[i]
        return ([StageLikelihoods(likelihoods.norms, likelihoods.flows, likelihoods.smooth, group)
                 for group in groups if group], self.scores)
