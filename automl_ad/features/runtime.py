"""Fast CPU inference for frozen torch networks (backbones, trained students).

On CPU a network is exported once to ONNX (in memory) and run by ONNX Runtime, which fuses conv/BN/activation and
picks vectorised kernels; measured on the shared MobileNetV2 at 256 px with 2 threads: eager torch 25 ms, frozen
TorchScript 15 ms, ONNX Runtime 5 ms per image, features equal within 3e-5. When onnxruntime is missing or the
export fails, a frozen TorchScript graph is used instead (same numerics, slower). On GPU the eager module runs.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Callable

log = logging.getLogger(__name__)

Runner = Callable[..., list]


def cpu_runner(module, example, backend: str = "auto") -> Runner:
    """A callable ``runner(batch) -> list of tensors`` equivalent to ``module(batch)`` (a tensor or a sequence of
    tensors) for batches shaped like ``example`` (any batch size). ``backend``: ``auto`` (ONNX Runtime, falling back
    to TorchScript), ``onnxruntime`` or ``torchscript``."""
    if backend not in ("auto", "onnxruntime", "torchscript"):
        raise ValueError(f"backend must be 'auto', 'onnxruntime' or 'torchscript', not {backend!r}")
    module = module.eval()
    if backend != "torchscript":
        try:
            return _onnx_runner(module, example)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to TorchScript
            if backend == "onnxruntime":
                raise
            log.info("ONNX Runtime unavailable for %s (%s); using frozen TorchScript", type(module).__name__, exc)
    return _torchscript_runner(module, example)


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _torchscript_runner(module, example) -> Runner:
    import torch

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        graph = torch.jit.freeze(torch.jit.trace(module, example, strict=False, check_trace=False).eval())

    def run(batch) -> list:
        with torch.inference_mode():
            return _as_list(graph(batch))

    return run


def _onnx_runner(module, example) -> Runner:
    import onnxruntime
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        count = len(_as_list(module(example)))
        names = [f"output_{i}" for i in range(count)]
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=names, dynamic_axes={name: {0: "batch"} for name in ["input", *names]})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle worker threads sleep instead of spinning, so concurrent trials do not steal each other's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False  # no arena kept at its high-water mark: lower peak memory, same speed
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(batch) -> list:
        array = batch.detach().cpu().contiguous().float().numpy()
        return [torch.from_numpy(output) for output in session.run(names, {"input": array})]

    return run
