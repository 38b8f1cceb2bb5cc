"""ONNX export of a detector's inference graph (:meth:`Detector.inference_graph`), checked against
``score_samples``.

The graph is exported as the in-memory runners export theirs (:func:`~automl_ad.features.runtime.
export_onnx_bytes`: torch's TorchScript-based exporter, opset 17, dynamic batch axis), then run with onnxruntime
(CPU) on the images given for the check and compared with ``detector.score_samples`` on the same images. Parity:
the largest absolute difference of the image scores and of the anomaly maps, each divided by the span (max - min)
of ``score_samples``' anomaly maps over those images (of its image scores for families without maps), must not
exceed :data:`PARITY_TOLERANCE`. A family without a graph, an export error or a failed check gives no file, and the
returned record says why; it never raises for those.

An int8 detector (``precision="int8"``) exports the network ``score_samples`` runs on in-memory images
(:func:`~automl_ad.features.quantize.int8_whole_graph`): the graph's normalisation, then the saved quantised
backbone (the same ONNX bytes, not a re-export of the fp32 torch network), then the family head (PatchCore's with
its nearest-neighbour product quantised too, as its ``score_samples`` runs it), joined with ``onnx.compose``. Its
parity check is the same (:data:`PARITY_TOLERANCE`): both sides run the same quantised network, so they agree as
closely as fp32 ones (where the fp32 network in place of the int8 one differs by about 0.2 of the map span on the
tests' images).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.features.runtime import OPSET, export_onnx_bytes

PARITY_TOLERANCE = 1e-3
INPUT_NAME, OUTPUT_NAMES = "images", ("image_scores", "anomaly_maps")


def export_onnx(detector, path: str | Path, images: ImageSet | None) -> dict:
    """Write ``detector``'s graph to ``path`` when it reproduces ``score_samples`` on ``images``; return the
    manifest's ``onnx`` record: ``file``, ``opset``, ``input``, ``outputs`` and parity figures, or ``file`` None
    and a ``reason``."""
    import torch

    path = Path(path)
    if images is None or len(images) == 0:
        return _absent("no images were given for the parity check")
    graph = detector.inference_graph()
    if graph is None:
        return _absent(detector.graph_absent_reason())
    try:
        inputs = detector.graph_input(images)
        example = inputs[:2]
        int8 = detector.int8_inference_model(graph.eval(), example, INPUT_NAME, OUTPUT_NAMES)
        path.write_bytes(export_onnx_bytes(graph.eval(), (torch.from_numpy(example),), [INPUT_NAME],
                                           list(OUTPUT_NAMES)) if int8 is None else int8[0])
        outputs = detector.per_image_scores(images, *run_onnx(path, inputs))  # the package's tile loop
        expected = detector.score_samples(images)
    except Exception as exc:  # noqa: BLE001 - any export or runtime failure only means: no ONNX in the package
        path.unlink(missing_ok=True)
        return _absent(f"ONNX export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})")
    parity = _parity(expected, outputs.image_scores, outputs.anomaly_maps)
    if parity["relative"] > PARITY_TOLERANCE:
        path.unlink(missing_ok=True)
        return _absent(f"parity check failed: onnxruntime differs from score() by {parity['relative']:.2e} of the "
                       f"output span (tolerance {PARITY_TOLERANCE:g}) on {len(images)} images")
    _, channels, height, width = inputs.shape
    geometry = detector.input_geometry()
    return {"file": path.name, "opset": OPSET,
            "input": {"name": INPUT_NAME, "shape": ["batch", channels, height, width], "dtype": "float32",
                      "layout": "NCHW", "range": [0.0, 1.0], "size": height, "width": width, "channels": channels,
                      "geometry": None if geometry is None else geometry.to_dict(),
                      "colour": ("luma 0.299 R + 0.587 G + 0.114 B, before resizing" if channels == 1 else
                                 "RGB; gray images repeated to 3 channels"),
                      "resize": "bilinear, antialiased; " + ("aspect ratio not kept" if geometry is None
                                                            else geometry.describe()),
                      "normalisation": "none outside: the graph normalises"},
            "outputs": [{"name": OUTPUT_NAMES[0], "shape": ["batch"], "dtype": "float32"},
                        {"name": OUTPUT_NAMES[1], "shape": ["batch", height, width], "dtype": "float32"}],
            "parity_max_abs_diff": {"image_scores": parity["image_scores"], "anomaly_maps": parity["anomaly_maps"]},
            "parity_relative": parity["relative"], "parity_tolerance": PARITY_TOLERANCE,
            "parity_images": len(images), "backbone_precision": "fp32" if int8 is None else "int8",
            **({} if int8 is None else {"quantisation": int8[1]})}


def run_onnx(path: str | Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, anomaly maps) of the ONNX model at ``path`` for a preprocessed batch (onnxruntime, CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)})
    return scores, maps


def _parity(expected, scores: np.ndarray, maps: np.ndarray) -> dict:
    """Largest absolute differences and the larger of them relative to the span of ``score_samples``' outputs."""
    score_diff = float(np.abs(scores - expected.image_scores).max())
    map_diff = 0.0
    reference = expected.image_scores
    if expected.anomaly_maps is not None:
        map_diff = float(np.abs(maps - expected.anomaly_maps).max())
        reference = expected.anomaly_maps
    span = float(np.ptp(reference))
    relative = max(score_diff, map_diff) / span if span > 0 else float(max(score_diff, map_diff) > 0) * np.inf
    return {"image_scores": score_diff, "anomaly_maps": map_diff, "relative": relative}


def _absent(reason: str) -> dict:
    warnings.warn(f"model.onnx is not part of the package: {reason}", stacklevel=3)
    return {"file": None, "reason": reason}
