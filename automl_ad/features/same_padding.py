"""Constant 'same' padding for timm's TensorFlow-style convolutions at a fixed input size.

timm's ``Conv2dSame`` (MobileNetV2 with the shared tflite weights, EfficientNets with ``pad_type='same'``) computes
its padding from the input size on every call. Exported to ONNX, that is a chain of Shape ops and a ``Pad`` before
each convolution, which ONNX Runtime runs as separate passes with layout reorders around them (about a quarter of
the shared MobileNetV2's time at 256 px). :func:`fix_same_padding` makes each such convolution read the size as a
plain number, so an exported graph (whose spatial size is fixed) holds constant padding: symmetric padding inside
the convolution, asymmetric padding (stride 2) as a constant ``Pad`` of value 0 that ONNX Runtime folds into it
(PaDiM's whole graph at 256 px: 10.2 -> 7.1 ms once the value was spelled out). Numerics are unchanged, and eager
calls still pad for whatever size they get.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding


class ConstantPaddingConv2dSame(Conv2dSame):
    """``Conv2dSame`` whose padding is computed from the input size as Python integers."""

    def forward(self, x):
        pads = [get_same_padding(int(size), kernel, stride, dilation) for size, kernel, stride, dilation
                in zip(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation)]
        (top, bottom), (left, right) = [(pad // 2, pad - pad // 2) for pad in pads]
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        # value=0.0 spelled out: the exporter then gives Pad a constant value input, where it otherwise writes an
        # empty one, and ONNX Runtime's Pad fusion folds only a Pad whose value is a constant.
        return F.conv2d(F.pad(x, (left, right, top, bottom), value=0.0), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


def fix_same_padding(model) -> None:
    """Turn every ``Conv2dSame`` of ``model`` into a :class:`ConstantPaddingConv2dSame` (same weights, in place)."""
    for module in model.modules():
        if type(module) is Conv2dSame:
            module.__class__ = ConstantPaddingConv2dSame
