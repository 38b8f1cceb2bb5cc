"""Fast CPU inference for frozen torch networks (backbones, trained students).

On CPU a network is exported once to ONNX (in memory) and run by ONNX Runtime, which fuses conv/BN/activation and
picks vectorised kernels; measured on the shared MobileNetV2 at 256 px with 2 threads: eager torch 25 ms, frozen
TorchScript 15 ms, ONNX Runtime 5 ms per image, features equal within 3e-5. When onnxruntime is missing or the
export fails, a frozen TorchScript graph is used instead (same numerics, slower). On GPU the eager module runs.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

log = logging.getLogger(__name__)

Runner = Callable[..., list]
#: The ONNX opset of every exported graph (in-memory runners and packages alike).
OPSET = 17


class SetupTime:
    """Seconds this process spent making networks ready to run: creating them and loading their weights, exporting
    graphs, opening runtime sessions. A fixed cost of a fit or a scoring, whatever its image count; a search trial
    reports it apart so that the cost predictor does not scale it with the images and pixels."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Count the enclosed block (once, when blocks nest)."""
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - start


#: Totals of the current process.
SETUP_TIME = SetupTime()


def cpu_runner(module, example, backend: str = "auto") -> Runner:
    """A callable ``runner(*batches) -> list of tensors`` equivalent to ``module(*batches)`` (a tensor or a sequence
    of tensors) for batches shaped like ``example`` (any batch size): one tensor, or a tuple of tensors for a module
    of several inputs. ``backend``: ``auto`` (ONNX Runtime, falling back to TorchScript), ``onnxruntime`` or
    ``torchscript``."""
    if backend not in ("auto", "onnxruntime", "torchscript"):
        raise ValueError(f"backend must be 'auto', 'onnxruntime' or 'torchscript', not {backend!r}")
    module = module.eval()
    examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    with SETUP_TIME.timing():
        if backend != "torchscript":
            try:
                return _onnx_runner(module, examples)
            except Exception as exc:
                if backend == "onnxruntime":
                    raise
                log.info("ONNX Runtime unavailable for %s (%s); using frozen TorchScript", type(module).__name__,
                         exc)
        return _torchscript_runner(module, examples)


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _torchscript_runner(module, examples: tuple) -> Runner:
    import torch

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        graph = torch.jit.freeze(torch.jit.trace(module, examples, strict=False, check_trace=False).eval())

    def run(*batches) -> list:
        with torch.inference_mode():
            return _as_list(graph(*batches))

    return run


def _onnx_runner(module, examples: tuple) -> Runner:
    return onnx_model_runner(export_onnx_bytes(module, examples))


def export_onnx_bytes(module, examples: tuple, input_names: list[str] | None = None,
                      output_names: list[str] | None = None) -> bytes:
    """``module`` exported to ONNX in memory by torch's TorchScript-based exporter (:data:`OPSET`, dynamic batch
    axis); inputs ``input`` (``input_<i>`` for several) and outputs ``output_<i>`` unless named."""
    import torch

    buffer = io.BytesIO()
    inputs = input_names or (["input"] if len(examples) == 1 else [f"input_{i}" for i in range(len(examples))])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes: the size is fixed by design
        names = output_names or [f"output_{i}" for i in range(len(_as_list(module(*examples))))]
        torch.onnx.export(module, examples, buffer, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=names, dynamic_axes={name: {0: "batch"} for name in [*inputs, *names]})
    return buffer.getvalue()


def onnx_model_runner(model: bytes, threads: int | None = None, arguments: Sequence[str] | None = None) -> Runner:
    """A runner for an ONNX model given as bytes (all outputs returned), on ``threads`` threads (default: torch's).
    Its arguments are the model's inputs in order, or the inputs named ``arguments`` (an exported module's
    arguments by name: the exporter drops those its graph does not read)."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle worker threads sleep instead of spinning, so concurrent trials do not steal each other's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The memory arena stays on (ONNX Runtime's default): without it every run allocates and page-faults its
    # activations afresh. Measured on the shared MobileNetV2 (2 threads): 62 -> 35 ms at 512x512, 17 -> 10 ms per
    # image at 256x256 batch 8, for ~60 MB more peak memory at batch 1 (the arena keeps its high-water mark).
    with SETUP_TIME.timing():
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = [node.name for node in session.get_inputs()]
    names = [node.name for node in session.get_outputs()]
    arguments = list(arguments or inputs)

    def run(*batches) -> list:
        feed = {name: batch.detach().cpu().contiguous().float().numpy() for name, batch in zip(arguments, batches)
                if name in inputs}
        return [torch.from_numpy(output) for output in session.run(names, feed)]

    return run


def concurrent_runner(branches: Sequence, join, example: tuple, prefix=None) -> Runner | None:
    """A runner for ``join(*outputs of every branch)`` whose ``branches`` (modules of the same inputs: ``example``,
    or ``prefix``'s outputs on it) run at once, each in its own ONNX Runtime session on an equal share of torch's
    threads; ``prefix`` and the join on all of them. At batch 1 one network's small convolutions keep a second core
    mostly idle, so two networks side by side on one thread each beat the two in turn on two threads (STPM's
    teacher and student, MobileNetV2 at 256 px, 2 cores: 9.9 -> 8.3 ms; equal at batch 8). None for fewer than two
    branches, or fewer threads than branches (a search trial sharing the cores): the caller runs the graph whole."""
    import torch

    threads = torch.get_num_threads()
    if not 2 <= len(branches) <= threads:
        return None
    with SETUP_TIME.timing(), torch.no_grad():
        first = None if prefix is None else onnx_model_runner(export_onnx_bytes(prefix.eval(), example))
        inputs = example if prefix is None else tuple(_as_list(prefix(*example)))
        outputs = tuple(o for branch in branches for o in _as_list(branch.eval()(*inputs)))
        runners = [_by_name_runner(branch, inputs, threads // len(branches)) for branch in branches]
        finish = _by_name_runner(join.eval(), outputs)
    pool = ThreadPoolExecutor(len(branches) - 1, thread_name_prefix="branch")

    def run(*batches) -> list:
        batches = batches if first is None else first(*batches)
        others = [pool.submit(runner, *batches) for runner in runners[1:]]  # ONNX Runtime releases the GIL
        outputs = runners[0](*batches)
        for other in others:
            outputs += other.result()
        return finish(*outputs)

    return run


def _by_name_runner(module, inputs: tuple, threads: int | None = None) -> Runner:
    """``module`` on ONNX Runtime taking all of ``inputs``' arguments, also those its graph does not read."""
    names = [f"input_{i}" for i in range(len(inputs))]
    return onnx_model_runner(export_onnx_bytes(module, inputs, input_names=names), threads, arguments=names)
