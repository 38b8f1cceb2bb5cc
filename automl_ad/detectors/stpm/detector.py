"""STPM (Wang et al., BMVC 2021): a student network learns to reproduce a pretrained teacher's feature pyramid.

1. Teacher: the frozen pretrained backbone's feature maps at ``feature_strides`` (default 4, 8 and 16: the
   paper's first three ResNet stages), taken from the shared feature cache (extracted once per image set).
2. Student: the same architecture (timm ``features_only``, same stages and creation arguments such as
   ``pad_type``), randomly initialised from ``seed`` and trained on the teacher's normalised input images to
   match it: loss = sum over stages of 0.5 * mean over positions of ||t/||t|| - s/||s|| ||^2 (features
   L2-normalised along channels), averaged over the batch. SGD with the paper's lr 0.4, momentum 0.9 and weight
   decay 1e-4 (``optimizer="adam"`` is available); ``epochs`` passes in shuffled ``batch_size`` batches, no
   augmentation. The paper trains 100 epochs at batch 32; we default to batch 8, which is stable with the same
   SGD settings and learns far more per epoch (a CPU budget allows few epochs): on MVTec bottle with MobileNetV2
   at 256 px, 3 epochs gave AUPRO 0.95 at batch 8 against 0.79 at batch 32, at the same cost per epoch.
   Stages after the deepest one used are not computed (MobileNet/EfficientNet students), which only saves time.
3. Anomaly map: per stage 0.5 * ||t/||t|| - s/||s|| ||^2 at every position, upsampled (bilinear) to the input
   size, combined by ``map_combination`` (the paper's product, or a sum); image score = the map's maximum.
   No smoothing by default, as the paper and anomalib (``smoothing_sigma`` > 0 adds a Gaussian blur).
   The student and the map run as one graph (ONNX Runtime on CPU), beside the teacher's cached features; images
   in memory run teacher and student at once, each on half the threads, then the map.
"""

from __future__ import annotations

import logging
import warnings

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.blocks import Normalise
from automl_ad.detectors.feature_based import BACKBONE_CONSTRAINTS
from automl_ad.detectors.graph_based import BackboneGraphDetector
from automl_ad.detectors.parameters import DECAY, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Options
from automl_ad.detectors.registry import register_detector
from automl_ad.detectors.stpm.graph import STPMHead, feature_distances
from automl_ad.features.backbone import activation_values, drop_unused_blocks

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
#: Bytes the student's training keeps per value its layers output for a batch (float32, for the backward pass):
#: measured 3.4-3.9 with MobileNetV2 (457 values per input pixel) and 4.0 with ResNet18 (170) at 256-512 px.
ACTIVATION_BYTES = 4
MAP_COMBINATIONS = ("product", "sum")


@register_detector
class STPM(BackboneGraphDetector):
    """Teacher-student route: a student regresses the teacher's normalised features; their gap is the anomaly."""

    name = "stpm"
    route = "teacher_student"
    iterative = True
    head_reads_images = True
    runs_in_parts = True
    test_params = {"backbone": "resnet18", "pretrained": False, "input_size": 64, "epochs": 12, "batch_size": 4}
    _parameter_constraints = {
        **BACKBONE_CONSTRAINTS, "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT],
        "optimizer": [Options(*OPTIMIZERS)], "learning_rate": [POSITIVE], "momentum": [DECAY],
        "weight_decay": [NON_NEGATIVE], "map_combination": [Options(*MAP_COMBINATIONS)],
        "smoothing_sigma": [NON_NEGATIVE], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, backbone="resnet18", feature_strides=(4, 8, 16), weights=None, pretrained=True, input_size=256,
                 geometry=None, device="auto", cache_features=True, precision="fp32", epochs=100, batch_size=8,
                 optimizer="sgd", learning_rate=0.4, momentum=0.9, weight_decay=1e-4, map_combination="product",
                 smoothing_sigma=0.0, seed=0):
        self._store_parameters(locals())

    # --- student ----------------------------------------------------------------------------------------------
    def _new_student(self):
        """A randomly initialised (from ``seed``) copy of the teacher's architecture on the teacher's device."""
        import timm
        import torch

        from automl_ad.features.same_padding import fix_same_padding

        extractor = self._extractor()
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            student = timm.create_model(self.backbone, pretrained=False, features_only=True,
                                        out_indices=tuple(extractor.model.feature_info.out_indices),
                                        **dict(extractor.spec.weights.create_kwargs))
        drop_unused_blocks(student)
        fix_same_padding(student)
        return student.to(extractor.device)

    def _set_student(self, student) -> None:
        self.student_ = student.eval()
        for parameter in self.student_.parameters():
            parameter.requires_grad_(False)

    # --- fit --------------------------------------------------------------------------------------------------
    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """The training set (inputs and teacher features, held through the fit) and a batch's activations through
        the student (``ACTIVATION_BYTES`` per value its layers output, counted from the architecture): the default's
        8 images per batch at 1024 px need about 15 GB with MobileNetV2."""
        strides, channels = cls._channels_at_strides(params)
        if channels is None:  # unknown backbone or stride: the trial reports it
            return 0.0
        per_pixel = activation_values(params.get("backbone", cls().backbone), strides)
        return cls._training_set_bytes(train_images, network_pixels, params) + \
            ACTIVATION_BYTES * per_pixel * cls._batch_pixels(train_images, network_pixels, params)

    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        import torch

        extractor = self._extractor()
        device = extractor.device
        targets = [torch.from_numpy(f) for f in self._features(train)]
        inputs = extractor.normalise(self.network_pixels(train))
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        student = self._new_student().to(memory_format=torch.channels_last).train()
        if self.optimizer == "sgd":
            optimiser = torch.optim.SGD(student.parameters(), lr=self.learning_rate, momentum=self.momentum,
                                        weight_decay=self.weight_decay)
        else:
            optimiser = torch.optim.Adam(student.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        count, batch_size = len(inputs), int(self.batch_size)
        for epoch in range(int(self.epochs)):
            order = torch.randperm(count, generator=generator)
            total, seen = 0.0, 0
            for start in self._until_deadline(range(0, count, batch_size)):
                index = order[start:start + batch_size]
                outputs = student(inputs[index.to(inputs.device)])
                loss = sum(feature_distances(t[index].to(device), s).mean() for t, s in zip(targets, outputs))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
                seen += len(index)
            mean_loss = total / seen
            if self._record_epoch(epoch, mean_loss, on_epoch, "lower learning_rate",
                                  interim=lambda: self._interim_state([student], student_=student)):
                break
        self._set_student(student.to(memory_format=torch.contiguous_format))
        log.info("%s: %d epochs, final loss %.5f", self.name, len(self.loss_history_), self.loss_history_[-1])

    # --- score ------------------------------------------------------------------------------------------------
    def _scoring_graph(self) -> STPMHead:
        weights = self._extractor().spec.weights
        return STPMHead(Normalise(weights.mean, weights.std), self.student_, self.input_size, self.map_combination,
                        self.smoothing_sigma)

    def _concurrent_parts(self, graph, example):
        """The teacher beside the student, then the maps."""
        return None, [graph.backbone, graph.head.network], graph.head.maps

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {k: v.detach().cpu().numpy() for k, v in self.student_.state_dict().items()}
        return tensors, self._backbone_state()

    def _restore(self, tensors, state):
        import torch

        self._check_backbone(state)
        student = self._new_student()
        device = self._extractor().device
        student.load_state_dict({k: torch.from_numpy(v).to(device) for k, v in tensors.items()})
        self._set_student(student)

