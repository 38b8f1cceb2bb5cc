"""int8 backbones: ONNX Runtime static quantisation of a frozen feature extractor, calibrated on training images.

:func:`quantise_backbone` exports the extractor's network (normalised NCHW batch -> feature maps, as
:func:`~automl_ad.features.runtime.cpu_runner` does for fp32) and quantises it with
``onnxruntime.quantization.quantize_static``:

* QDQ format (QuantizeLinear/DequantizeLinear pairs around the int8 operators): the model stays a standard ONNX
  graph that any ONNX Runtime runs and that can be composed with a family's head for packages;
* int8 weights quantised per output channel, uint8 activations (U8S8): in a rough check on an AVX-512 VNNI CPU
  (not a benchmark) ONNX Runtime ran MobileNetV2 and ResNet-18 2-3x faster with U8S8 than with S8S8, and
  MobileNetV2 in S8S8 was no faster than fp32. On x86 without VNNI, U8S8 products may saturate (onnxruntime's
  documentation); the search measures each int8 trial's accuracy on validation, so where that costs accuracy fp32
  keeps its place on the front;
* MinMax calibration on up to :data:`~automl_ad.defaults.INT8_CALIBRATION_IMAGES` training images. Not
  Percentile: anomaly detection reads exactly the activations that normal images rarely produce; a percentile
  range calibrated on normal images clips them (a defect's feature saturates at the range of normal ones), while
  the MinMax range keeps the largest activation seen and only loses resolution.

The result is the ONNX model as bytes: the detector saves it (a uint8 array in its safetensors) so that a
loaded model scores with the same quantised graph, without recalibrating.

A family whose head is dominated by one matrix product with a constant (PatchCore's distances to its memory bank)
may also have that product quantised (:func:`quantise_products`: ONNX Runtime *dynamic* quantisation, int8
constant per column, uint8 activations quantised per run, no calibration): on an AVX-512 VNNI CPU with 2 threads the
1024 x 128 x 2140 nearest-neighbour product of PatchCore on bottle takes 1.0 ms instead of 3.2 ms in fp32 (which
runs at about 176 GFLOP/s, the cores' fp32 peak).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from automl_ad.features.runtime import export_onnx_bytes

#: What the manifest and reports say an int8 backbone is.
INT8_SCHEME = "onnxruntime static QDQ, int8 weights per channel, uint8 activations, MinMax calibration"
#: What they add when the head's constant products are quantised too (:func:`quantise_products`).
INT8_PRODUCTS_SCHEME = "head matrix products with constants: onnxruntime dynamic quantisation (int8 constants " \
    "per column, uint8 activations quantised per run)"


def quantise_backbone(extractor, calibration: np.ndarray) -> bytes:
    """The extractor's network quantised to int8 (ONNX bytes), calibrated on ``calibration``: (N, h, w, 3) float
    network inputs in [0, 1] (images under the extractor's geometry), fed one at a time as it runs on CPU."""
    import onnxruntime
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one training image")
    height, width = calibration.shape[1:3]
    fp32 = export_onnx_bytes(extractor.model.cpu().eval(), (torch.zeros(1, 3, height, width),))
    batches = [extractor.normalise(calibration[i:i + 1]).cpu().numpy() for i in range(len(calibration))]
    with tempfile.TemporaryDirectory(prefix="automl_ad_int8_") as folder:
        source, prepared, target = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        # the quantiser's own sessions warn about every constant the exporter left unused: not the user's concern
        onnxruntime.set_default_logger_severity(3)
        # shape inference and graph optimisation first (constant shape arithmetic folded, e.g. timm's "same"
        # padding), as onnxruntime recommends: fewer tensors to calibrate, fewer quantisation points
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), _Batches(batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return target.read_bytes()


def quantise_products(model: bytes) -> bytes:
    """``model`` (ONNX bytes, one opset) with its matrix products by a constant (``MatMul`` whose second input is
    an initializer) quantised dynamically: ``DynamicQuantizeLinear`` of the activations each run, ``MatMulInteger``
    with the constant in int8 (a scale per output column: per bank feature for PatchCore, where it kept the maps
    closer to fp32 than one scale did, 2.1% against 2.9% of their span in the median on magnetic_tile), the product
    scaled back to float. Other nodes stay fp32."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="automl_ad_int8_") as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model)
        onnxruntime.set_default_logger_severity(3)
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
        return target.read_bytes()


def model_digest(model: bytes) -> str:
    """sha256 of an ONNX model's bytes: identifies a quantised backbone (feature-cache keys, saved state)."""
    return hashlib.sha256(model).hexdigest()


def calibration_indices(count: int, limit: int) -> np.ndarray:
    """Up to ``limit`` indices spread evenly over ``count`` training images (deterministic: the same training set
    gives the same calibration, the same quantised graph and so the same cached features)."""
    return np.unique(np.linspace(0, count - 1, num=min(count, limit)).round().astype(np.int64))


def int8_whole_graph(graph, backbone: bytes, example: np.ndarray, input_name: str = "input",
                     output_names: tuple[str, str] = ("output_0", "output_1"), head_products: bool = False) -> bytes:
    """An int8 backbone family's whole inference as one ONNX model: ``graph`` (a :class:`~automl_ad.detectors.
    blocks.FeatureGraph`)'s normalisation, the quantised ``backbone`` network (inputs ``input``, outputs
    ``output_<i>``) and ``graph``'s head (its constant products quantised by :func:`quantise_products` when
    ``head_products``), joined by ``onnx.compose`` (each part's inner names prefixed so that they stay apart).
    ``example``: a batch of network inputs (only its shape matters). The detector scores in-memory images with this
    model and packages carry it, so both run the same graph."""
    import onnx
    import torch
    from onnx import compose, helper

    images = torch.from_numpy(example)
    with torch.no_grad():
        features = list(graph.backbone.model(graph.backbone.normalise(images)))  # only their shapes matter
    network = onnx.load_from_string(backbone)
    before = onnx.load_from_string(export_onnx_bytes(graph.backbone.normalise, (images,), [input_name],
                                                     ["normalised"]))
    if graph.with_images:  # the head reads the images too: pass them through to it
        before.graph.node.append(helper.make_node("Identity", [input_name], ["head_images"]))
        passed = before.graph.output.add()
        passed.CopyFrom(before.graph.input[0])
        passed.name = "head_images"
    head_inputs = ["head_images"] * graph.with_images + [f"feature_{i}" for i in range(len(features))]
    head = export_onnx_bytes(graph.head, (images,) * graph.with_images + tuple(features), head_inputs,
                             list(output_names))
    head = onnx.load_from_string(quantise_products(head) if head_products else head)
    # inner names prefixed so that the parts' tensors stay apart (onnx renames their outputs too: read them back)
    parts = [compose.add_prefix(part, f"{name}/", rename_inputs=False)
             for name, part in (("preprocess", before), ("backbone", network), ("head", head))]
    ir_version = max(part.ir_version for part in parts)
    for part in parts:
        part.ir_version = ir_version
    normalised, *passed_images = [output.name for output in parts[0].graph.output]
    network_outputs = [output.name for output in parts[1].graph.output]
    joined = compose.merge_models(parts[0], parts[1], io_map=[(normalised, parts[1].graph.input[0].name)],
                                  outputs=network_outputs + passed_images)
    joined = compose.merge_models(joined, parts[2], io_map=[*zip(network_outputs, head_inputs[graph.with_images:]),
                                                            *zip(passed_images, head_inputs[:graph.with_images])])
    for output, name in zip(joined.graph.output, output_names):
        _rename_tensor(joined.graph, output.name, name)
    onnx.checker.check_model(joined)
    return joined.SerializeToString()


def _rename_tensor(graph, old: str, new: str) -> None:
    """Rename tensor ``old`` of ``graph`` (its producers, consumers and graph outputs) to ``new``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for output in graph.output:
        if output.name == old:
            output.name = new


class _Batches:
    """Feeds the calibration batches to the quantiser once (an ``onnxruntime.quantization.CalibrationDataReader``
    by its ``get_next`` method, which is all the protocol asks)."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}
