"""ONNX export of a detector's inference graph (:meth:`Detector.inference_graph`), checked against
``score_samples``.

The graph is exported with torch's TorchScript-based exporter (``dynamo=False``, opset 17, dynamic batch axis),
then run with onnxruntime (CPU) on the images given for the check and compared with ``detector.score_samples``
on the same images. Parity: the largest absolute difference of the image scores and of the anomaly maps, each divided
by the span (max - min) of ``score_samples``' anomaly maps over those images (of its image scores for families without
maps), must not exceed :data:`PARITY_TOLERANCE`. A family without a graph, an export error or a failed check
gives no file, and the returned record says why; it never raises for those.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from automl_ad.data.imageset import ImageSet

OPSET = 17
PARITY_TOLERANCE = 1e-3
INPUT_NAME, OUTPUT_NAMES = "images", ("image_scores", "anomaly_maps")


def export_onnx(detector, path: str | Path, images: ImageSet | None) -> dict:
    """Write ``detector``'s graph to ``path`` when it reproduces ``score_samples`` on ``images``; return the
    manifest's ``onnx`` record: ``file``, ``opset``, ``input``, ``outputs`` and parity figures, or ``file`` None
    and a ``reason``."""
    path = Path(path)
    if images is None or len(images) == 0:
        return _absent("no images were given for the parity check")
    graph = detector.inference_graph()
    if graph is None:
        return _absent(detector.graph_absent_reason())
    try:
        inputs = detector.graph_input(images)
        _export(graph.eval(), inputs[:2], path)
        scores, maps = run_onnx(path, inputs)
        expected = detector.score_samples(images)
    except Exception as exc:  # noqa: BLE001 - any export or runtime failure only means: no ONNX in the package
        path.unlink(missing_ok=True)
        return _absent(f"ONNX export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})")
    parity = _parity(expected, scores, maps)
    if parity["relative"] > PARITY_TOLERANCE:
        path.unlink(missing_ok=True)
        return _absent(f"parity check failed: onnxruntime differs from score() by {parity['relative']:.2e} of the "
                       f"output span (tolerance {PARITY_TOLERANCE:g}) on {len(images)} images")
    _, channels, height, width = inputs.shape
    return {"file": path.name, "opset": OPSET,
            "input": {"name": INPUT_NAME, "shape": ["batch", channels, height, width], "dtype": "float32",
                      "layout": "NCHW", "range": [0.0, 1.0], "size": height, "channels": channels,
                      "colour": ("luma 0.299 R + 0.587 G + 0.114 B, before resizing" if channels == 1 else
                                 "RGB; gray images repeated to 3 channels"),
                      "resize": "bilinear, antialiased, aspect ratio not kept",
                      "normalisation": "none outside: the graph normalises"},
            "outputs": [{"name": OUTPUT_NAMES[0], "shape": ["batch"], "dtype": "float32"},
                        {"name": OUTPUT_NAMES[1], "shape": ["batch", height, width], "dtype": "float32"}],
            "parity_max_abs_diff": {"image_scores": parity["image_scores"], "anomaly_maps": parity["anomaly_maps"]},
            "parity_relative": parity["relative"], "parity_tolerance": PARITY_TOLERANCE,
            "parity_images": len(images)}


def run_onnx(path: str | Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, anomaly maps) of the ONNX model at ``path`` for a preprocessed batch (onnxruntime, CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)})
    return scores, maps


def _export(graph, example: np.ndarray, path: Path) -> None:
    import torch

    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes: the size is fixed by design
        torch.onnx.export(graph, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: batch, OUTPUT_NAMES[0]: batch, OUTPUT_NAMES[1]: batch})


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
