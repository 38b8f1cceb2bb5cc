"""Families whose inference is a torch graph score through it: the graph is their one implementation of
``score_samples``, the same module exported as ONNX in packages (:meth:`Detector.inference_graph`).

``_score`` builds the family's scoring graph once per fitted state (again after ``fit`` or ``set_params``) and
runs it in batches: on CPU through ONNX Runtime (:func:`~automl_ad.features.runtime.cpu_runner`: exported once
in memory), on a GPU in torch. Mid-training (interim scores for early stopping) it runs the graph eagerly, since
the weights change every epoch.

Backbone families (:class:`BackboneGraphDetector`) run a *head*: the graph from the backbone's feature maps on,
so that the features still come from the feature cache; their exported graph is the backbone followed by that
head, and images that skip the cache (in memory: deployment, a latency measurement) run that whole graph in one
session, or in parts side by side where a family has them (STPM's teacher and student, FastFlow's flows).

The graph runs on network inputs (:meth:`Detector.graph_input`): one per image for a squash or letterbox, one per
tile for tiles; ``score_samples`` then turns its per-input outputs into per-image scores and full-resolution maps
(:meth:`Detector.per_image_scores`), and a package runs the same loop around its ``model.onnx``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector, EpochCallback, Scores
from automl_ad.detectors.blocks import Backbone, FeatureGraph, on_cpu, tensors_of
from automl_ad.detectors.feature_based import BackboneDetector
from automl_ad.features import resolve_device
from automl_ad.features.quantize import INT8_PRODUCTS_SCHEME, INT8_SCHEME, int8_whole_graph, quantise_products
from automl_ad.features.runtime import (
    SETUP_TIME,
    Runner,
    concurrent_runner,
    cpu_runner,
    export_onnx_bytes,
    onnx_model_runner,
)

#: An ONNX model is one protobuf message, which cannot exceed 2 GiB: a graph whose constants (weights, a PatchCore
#: memory bank, PaDiM's inverse covariances) come close to it runs in eager torch on CPU instead of ONNX Runtime.
#: The margin leaves room for the graph's own structure.
ONNX_CONSTANTS_LIMIT = 2**31 - 2**26
#: Images per graph run unless a family bounds it (see :meth:`GraphDetector._graph_batch_size`).
GRAPH_BATCH = 16


class GraphDetector(Detector):
    """A family whose scoring is :meth:`_scoring_graph`: subclasses implement it instead of ``_score``."""

    _runners: dict[str, Runner] | None = None  # built graphs ready to run, by name ("head", "whole")
    #: The runner that scores in-memory images with the whole inference graph (:meth:`inference_graph`).
    _whole_runner: ClassVar[str] = "head"

    # --- hooks for families -----------------------------------------------------------------------------------
    def _scoring_graph(self) -> nn.Module:
        """The module ``_score`` runs on :meth:`_graph_inputs`, returning (image scores (N,), maps (N, H, W)).
        It may share the detector's own (eval-mode) modules."""
        raise NotImplementedError

    def _graph_inputs(self, images: ImageSet) -> list[np.ndarray]:
        """The scoring graph's inputs for ``images`` (arrays with one row per network input of
        :meth:`~Detector.input_geometry`: per image, or per tile)."""
        return [self.graph_input(images)]

    def _graph_batch_size(self) -> int:
        """Images per graph run (bounds the memory of the graph's intermediate tensors)."""
        return GRAPH_BATCH

    def _graph_exportable(self) -> bool:
        """Whether the scoring graph is plain torch (False: it calls into another library, so it runs eagerly and
        :meth:`inference_graph` is None)."""
        return True

    def _graph_device(self, graph: nn.Module) -> torch.device:
        """Where the graph runs: the device of its modules (the CPU when it has none elsewhere)."""
        return next((t.device for t in tensors_of(graph) if t.device.type != "cpu"), torch.device("cpu"))

    def _whole_graph(self) -> nn.Module:
        """The whole inference, from :meth:`graph_input`'s batch to (image scores, maps)."""
        return self._scoring_graph()

    # --- the contract -----------------------------------------------------------------------------------------
    def inference_graph(self) -> nn.Module | None:
        self._check_fitted()
        self._validate_params()
        return on_cpu(self._whole_graph().eval()) if self._graph_exportable() else None

    def use_inference_model(self, model: bytes) -> bool:
        """Score in-memory images with ``model``, :meth:`inference_graph` already exported to ONNX (a package's
        ``model.onnx``), instead of exporting the graph again (1-2 s with the shared MobileNetV2). Taken only
        where the graph would run through ONNX Runtime anyway (the CPU); returns whether it was."""
        self._check_fitted()
        device = getattr(self, "device", "cpu")  # families without a device parameter run on the CPU
        if resolve_device(device) != "cpu" or not self._graph_exportable():
            return False
        self._runners = {**(self._runners or {}), self._whole_runner: onnx_model_runner(model)}
        return True

    def fit(self, train: ImageSet, on_epoch: EpochCallback | None = None, deadline: float | None = None) -> Detector:
        self._runners = None
        return super().fit(train, on_epoch, deadline)

    def set_params(self, **params):
        self._runners = None
        return super().set_params(**params)

    def __getstate__(self):
        """Copies and pickles leave the runners out (ONNX Runtime sessions); they build their own."""
        state = super().__getstate__()
        state.pop("_runners", None)
        return state

    def _score(self, images: ImageSet) -> Scores:
        inputs = self._graph_inputs(images)
        return self._run_batches(self._graph_runner("head", self._scoring_graph, inputs,
                                                    compile_graph=self._head_session), inputs)

    def _head_session(self, graph: nn.Module, example: tuple) -> Runner:
        """The scoring graph on ONNX Runtime (the CPU)."""
        return cpu_runner(graph, example)

    def _run_batches(self, run: Runner, inputs: list[np.ndarray]) -> Scores:
        """``run`` over ``inputs`` in batches of :meth:`_graph_batch_size` rows; (scores, maps) per row."""
        step = self._graph_batch_size()
        scores, maps = [], []
        for start in range(0, len(inputs[0]), step):  # one row per network input (tiles: several per image)
            batch = [torch.from_numpy(np.ascontiguousarray(x[start:start + step])) for x in inputs]
            image_scores, anomaly_maps = run(*batch)
            scores.append(image_scores.float().cpu().numpy())
            maps.append(anomaly_maps.float().cpu().numpy())
        return Scores(np.concatenate(scores), np.concatenate(maps))

    def _graph_runner(self, name: str, build, inputs: list[np.ndarray], eager_on_cpu: bool = True,
                      compile_graph=cpu_runner) -> Runner | None:
        """The graph ``build()`` ready to run on inputs like ``inputs``: built once per fitted state and kept under
        ``name`` (on ONNX Runtime by ``compile_graph(graph, example batches)``), but afresh (eager) mid-training.
        None when it cannot run on ONNX Runtime on CPU and ``eager_on_cpu`` is False."""
        if self._scoring_mid_training:
            return self._eager(build())
        self._runners = self._runners or {}
        if name not in self._runners:
            graph = build().eval()
            if self._runs_on_onnx_runtime(graph):
                # a batch of two: a trace at batch 1 could fix shapes that vary with the batch
                example = tuple(torch.from_numpy(np.ascontiguousarray(np.concatenate([x[:1]] * 2))) for x in inputs)
                self._runners[name] = compile_graph(graph, example)
            elif eager_on_cpu or self._graph_device(graph).type != "cpu":
                self._runners[name] = self._eager(graph)
            else:
                self._runners[name] = None
        return self._runners[name]

    def _runs_on_onnx_runtime(self, graph: nn.Module) -> bool:
        """Whether ``graph`` runs through ONNX Runtime: on CPU, plain torch, and its constants fit one ONNX model."""
        return self._graph_device(graph).type == "cpu" and self._graph_exportable() and \
            sum(t.numel() * t.element_size() for t in tensors_of(graph)) <= ONNX_CONSTANTS_LIMIT

    def _eager(self, graph: nn.Module) -> Runner:
        """``graph`` run by torch on its device (a GPU, or the CPU past the ONNX size limit or mid-training)."""
        device = self._graph_device(graph)
        graph = graph.to(device)

        def run(*batches) -> list:
            with torch.inference_mode():
                return list(graph(*[b.to(device) for b in batches]))

        return run


class BackboneGraphDetector(GraphDetector, BackboneDetector):
    """A backbone family whose scoring graph is a head on the backbone's feature maps (read through the feature
    cache); its :meth:`inference_graph` is the backbone followed by the head (:class:`FeatureGraph`)."""

    #: Whether the head reads the images (before the feature maps), as STPM's student does.
    head_reads_images: ClassVar[bool] = False
    #: Whether the whole graph runs on CPU in parts, some side by side (:meth:`_concurrent_parts`).
    runs_in_parts: ClassVar[bool] = False
    #: Whether ``precision="int8"`` quantises the head's products by a constant too
    #: (:func:`~automl_ad.features.quantize.quantise_products`), for a head that one such product dominates.
    int8_head_products: ClassVar[bool] = False
    _whole_runner: ClassVar[str] = "whole"

    def _graph_inputs(self, images: ImageSet) -> list[np.ndarray]:
        features = self._features(images)
        return [self.graph_input(images), *features] if self.head_reads_images else features

    def _score(self, images: ImageSet) -> Scores:
        """Images that skip the feature cache (in memory: deployment, a latency measurement) run the whole graph,
        backbone and head in one ONNX Runtime session on CPU, with no feature round trip through numpy (int8: the
        quantised backbone's whole graph, the one packages carry); files read their features through the cache
        and run the head."""
        if self._scoring_mid_training or (self.cache_features and images.paths is not None):
            return super()._score(images)
        inputs = [self.graph_input(images)]
        run = self._graph_runner(self._whole_runner, self._whole_graph, inputs, eager_on_cpu=False,
                                 compile_graph=self._int8_session if self._precision() == "int8" else
                                 self._fp32_session)
        return super()._score(images) if run is None else self._run_batches(run, inputs)

    def _fp32_session(self, graph: FeatureGraph, example: tuple) -> Runner:
        """The whole graph on ONNX Runtime: in parts where the family has them and the threads allow, else one
        session."""
        parts = self._concurrent_parts(graph, example) if self.runs_in_parts else None
        run = concurrent_runner(parts[1], parts[2], example, prefix=parts[0]) if parts else None
        return run or cpu_runner(graph, example)

    def _concurrent_parts(self, graph: FeatureGraph, example: tuple) -> tuple[nn.Module | None, list, nn.Module]:
        """(a prefix or None, the branches that run side by side on its outputs or on the images, the join on
        the branches' outputs) making up ``graph`` (:func:`concurrent_runner`), for families that
        :attr:`runs_in_parts`."""
        raise NotImplementedError

    def use_inference_model(self, model: bytes) -> bool:
        """As :meth:`GraphDetector.use_inference_model`, but a family that :attr:`runs_in_parts` declines: the
        package's one graph would run them in turn, so it exports its parts again (1-2 s)."""
        return False if self.runs_in_parts else super().use_inference_model(model)

    def _int8_session(self, graph: nn.Module, example: tuple) -> Runner:
        """The int8 whole graph (the one packages carry) as one ONNX Runtime session; building ``graph``
        calibrated the int8 backbone if fit had not yet."""
        return onnx_model_runner(self.int8_inference_model(graph, example[0].numpy())[0])

    def int8_inference_model(self, graph: nn.Module, example: np.ndarray, input_name: str = "input",
                             output_names: tuple[str, str] = ("output_0", "output_1")) -> tuple[bytes, str] | None:
        """The int8 backbone's whole graph (:func:`~automl_ad.features.quantize.int8_whole_graph`), its head's
        constant products quantised too where the family says so (:attr:`int8_head_products`)."""
        if self.int8_backbone_ is None:
            return None
        model = int8_whole_graph(graph, self.int8_backbone_, example, input_name, output_names,
                                 head_products=self.int8_head_products)
        return model, INT8_SCHEME + (f"; {INT8_PRODUCTS_SCHEME}" if self.int8_head_products else "")

    def _head_session(self, graph: nn.Module, example: tuple) -> Runner:
        """The head on ONNX Runtime, its constant products quantised as in the int8 whole graph where the family
        has them (so that cached features score as in-memory images and packages do)."""
        if self._precision() == "int8" and self.int8_head_products:
            with SETUP_TIME.timing():
                return onnx_model_runner(quantise_products(export_onnx_bytes(graph, example)))
        return super()._head_session(graph, example)

    def _graph_device(self, graph: nn.Module) -> torch.device:
        return torch.device(self._extractor().device)

    def _whole_graph(self) -> nn.Module:
        return FeatureGraph(Backbone(self._extractor()), self._scoring_graph(), self.head_reads_images)
