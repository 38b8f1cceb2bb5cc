"""Shared pieces for families built on pretrained backbone features (PatchCore, PaDiM, FastFlow, STPM...).

Subclasses list the backbone parameters in their own ``__init__`` (scikit-learn reads parameters from the
signature): ``backbone``, ``feature_strides``, ``weights``, ``pretrained``, ``input_size``, ``device``,
``cache_features``, ``precision``, ``geometry``; their constraints are :data:`BACKBONE_CONSTRAINTS`.

``geometry`` (a dict as :meth:`Geometry.to_dict <automl_ad.data.geometry.Geometry.to_dict>`; None, the default, is
a squash to ``input_size`` x ``input_size``, what every family did before) says how an image becomes network
inputs: squashed, letterboxed (aspect kept, padded) or cut into overlapping tiles. Fit and scoring see one row per
network input; ``input_size`` stays the side of each input's score map, which
:meth:`~automl_ad.detectors.base.Detector.per_image_scores` stitches back to the image's aspect (the image
score is the largest of its inputs' scores). Families with per-position statistics (PaDiM) treat the tiles of every
position as samples of one distribution: a grid of tiles depends on the image size, which may vary within a dataset,
and the tiles that need tiling are the images' small structures, which look alike wherever they fall.

``precision="int8"`` runs the frozen backbone as an int8 network (ONNX Runtime static quantisation, see
:mod:`automl_ad.features.quantize`) calibrated at ``fit`` on up to ``INT8_CALIBRATION_IMAGES`` training images, for
fit and scoring alike, and saves it with the model. It is CPU-only: ``fit`` refuses it when the device is a GPU
rather than fall back to fp32 (an fp32 result under an int8 label would mislead the search's Pareto front).
Families that fine-tune the backbone (CutPaste) have no ``precision``: a static int8 graph cannot be trained.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from automl_ad.data.geometry import Geometry
from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import INT8_CALIBRATION_IMAGES, PRECISIONS
from automl_ad.detectors.base import Detector
from automl_ad.detectors.parameters import POSITIVE_INT, Constraint, Options, PowerOfTwo, TupleOf
from automl_ad.errors import AutomlAdError, ConfigError, InvalidParameterError
from automl_ad.features import FeatureCache, extract_features, load_extractor, resolve_device
from automl_ad.features.backbone import feature_channels, int8_extractor
from automl_ad.features.quantize import calibration_indices, quantise_backbone

_CACHE: FeatureCache | None = None
#: Bytes per training pixel that a family training in epochs holds through its fit: float32 copies of every network
#: input (two of its 3 channels: the normalised inputs, and the decoded ones' memory, which the allocator keeps) and
#: of its features (one). With MobileNetV2 (2.4 feature values per pixel) that is 4 x (6 + 2.4) = 34 bytes; measured:
#: STPM on ball_screw's 480x512 tiles from 20 to 80 images 31, on 512x512 arrays held in memory (3 bytes more) from
#: 16 to 64 images 47, FastFlow 41.
TRAINING_INPUT_COPIES, TRAINING_FEATURE_COPIES = 2, 1


def feature_cache() -> FeatureCache:
    """The process-wide feature cache (location from ``$AUTOML_AD_CACHE_DIR``)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = FeatureCache()
    return _CACHE


class InputGeometry(Constraint):
    """A geometry as :meth:`Geometry.to_dict <automl_ad.data.geometry.Geometry.to_dict>` (JSON-able, so it is
    saved with the model and searched as a categorical)."""

    def allows(self, value) -> bool:
        return _geometry_problem(value) is None

    def __str__(self) -> str:
        return ("a geometry mapping such as {'mode': 'tile', 'height': 256, 'width': 256, 'scale': 0.5, "
                "'overlap': 32, 'pad': 'reflect'} (modes squash, letterbox, tile)")


def _geometry_problem(value) -> str | None:
    try:
        Geometry.from_dict(value)
    except (ConfigError, TypeError) as exc:
        return str(exc)
    return None


#: Constraints of the backbone parameters (which strides a backbone offers is checked when it is loaded).
BACKBONE_CONSTRAINTS = {
    "backbone": [str], "feature_strides": [TupleOf(PowerOfTwo(2))], "weights": [None, str, os.PathLike],
    "pretrained": [bool], "input_size": [POSITIVE_INT], "device": [str], "cache_features": [bool],
    "precision": [Options(*PRECISIONS)], "geometry": [None, InputGeometry()],
}

#: The saved-state array holding an int8 backbone's ONNX bytes (uint8).
INT8_BACKBONE_TENSOR = "int8_backbone_onnx"


class BackboneDetector(Detector):
    """A detector reading feature maps of a timm backbone at ``feature_strides``."""

    #: Whether the family's own network reads ``input_size`` x ``input_size`` pixels (it trains on them), so that a
    #: geometry's network input (a letterbox box, a tile) must be that square.
    square_network_input: ClassVar[bool] = False

    #: The int8 backbone (ONNX bytes) of a fitted ``precision="int8"`` detector, None otherwise.
    int8_backbone_: bytes | None = None
    #: The training set while ``fit`` runs: the int8 backbone is calibrated on it when first needed.
    _calibration_set: ImageSet | None = None

    def fit(self, train: ImageSet, on_epoch=None, deadline=None):
        self.int8_backbone_ = None
        if self._precision() == "int8":
            self._validate_params()
            self._check_int8_device()
        self._calibration_set = train
        try:
            return super().fit(train, on_epoch, deadline)
        finally:
            self._calibration_set = None

    @classmethod
    def _channels_of(cls, params: dict) -> tuple[tuple[int, ...], int | None]:
        """``params``' feature strides (the family's default unless set) and the channels its backbone has there in
        all, read from the architecture; None when the backbone or a stride is unknown (the trial reports that)."""
        strides, channels = cls._channels_at_strides(params)
        return strides, None if channels is None else sum(channels)

    @classmethod
    def _channels_at_strides(cls, params: dict) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """``params``' feature strides (the family's default unless set) and its backbone's channels at each; None
        when the backbone or a stride is unknown."""
        defaults = cls()
        strides = tuple(params.get("feature_strides", defaults.feature_strides))
        try:
            return strides, feature_channels(params.get("backbone", defaults.backbone), strides)
        except (RuntimeError, ValueError):
            return strides, None

    @classmethod
    def _network_input_hw(cls, params: dict) -> tuple[int, int]:
        """(height, width) of one network input under ``params``: the geometry's, else the ``input_size`` square."""
        if isinstance(params.get("geometry"), dict):
            return Geometry.from_dict(params["geometry"]).input_hw
        side = int(params.get("input_size", cls().input_size))
        return side, side

    @classmethod
    def _feature_values(cls, params: dict) -> float | None:
        """Feature values per input pixel at ``params``' strides (channels / stride², summed); None when the backbone
        or a stride is unknown."""
        strides, channels = cls._channels_at_strides(params)
        return None if channels is None else sum(c / s ** 2 for c, s in zip(channels, strides))

    @classmethod
    def _training_set_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """Bytes an epoch-trained fit holds of its training set (see :data:`TRAINING_INPUT_COPIES`)."""
        features = cls._feature_values(params) or 0.0
        values = 3 * TRAINING_INPUT_COPIES + features * TRAINING_FEATURE_COPIES
        return 4.0 * train_images * network_pixels * values

    @classmethod
    def _batch_pixels(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """Input pixels of one training batch: ``batch_size`` network inputs, at most all of them."""
        height, width = cls._network_input_hw(params)
        return min(int(params.get("batch_size", cls().batch_size)) * height * width, train_images * network_pixels)

    def input_geometry(self) -> Geometry | None:
        """``geometry`` as a :class:`~automl_ad.data.geometry.Geometry` (None: the squash to ``input_size``)."""
        return None if self.geometry is None else Geometry.from_dict(self.geometry)

    def _validate_params(self) -> None:
        """The declared constraints, with the reason a geometry is refused."""
        problem = None if self.geometry is None else _geometry_problem(self.geometry)
        if problem:
            raise InvalidParameterError(f"{self.name}: geometry must be {InputGeometry()}, got {self.geometry!r} "
                                        f"({problem})")
        super()._validate_params()
        side = int(self.input_size)
        if self.square_network_input and self.geometry is not None and self.input_geometry().input_hw != (side, side):
            raise InvalidParameterError(f"{self.name}: its network reads square {side}x{side} images (input_size), "
                                        f"so the geometry's network input must be {side}x{side}, not "
                                        f"{self.input_geometry().height}x{self.input_geometry().width}")

    def _precision(self) -> str:
        """``precision``, fp32 for families without the parameter (they fine-tune the backbone)."""
        return getattr(self, "precision", "fp32")

    def _check_int8_device(self) -> None:
        device = resolve_device(self.device)
        if device != "cpu":
            raise InvalidParameterError(f"{self.name}: precision int8 runs on CPU through ONNX Runtime; use fp32 on "
                                        f"a GPU (device resolves to {device!r}), or device='cpu'")

    def _extractor(self):
        """The backbone's feature extractor: fp32, or for ``precision="int8"`` the quantised network (calibrated
        here on the training set during ``fit``, restored by ``load``)."""
        if self._precision() == "int8":
            self._check_int8_device()
        extractor = load_extractor(self.backbone, self.feature_strides, self.input_size, weights=self.weights,
                                   pretrained=self.pretrained, device=self.device,
                                   geometry=self.input_geometry())
        if self._precision() != "int8":
            return extractor
        if self.int8_backbone_ is None:
            if self._calibration_set is None:
                raise AutomlAdError(f"{self.name}: the int8 backbone is calibrated by fit; fit (or load) the "
                                    "detector first")
            train = self._calibration_set
            sample = train.subset(calibration_indices(len(train), INT8_CALIBRATION_IMAGES))
            inputs = self.network_pixels(sample)  # tiles: several per image
            self.int8_backbone_ = quantise_backbone(
                extractor, inputs[calibration_indices(len(inputs), INT8_CALIBRATION_IMAGES)])
        return int8_extractor(extractor, self.int8_backbone_)

    def _features(self, images: ImageSet) -> list[np.ndarray]:
        """Feature maps (one float32 array (M, C, h, w) per stride; one row per network input of the geometry, in
        :meth:`ImageSet.network_inputs` order). Image files go through the feature cache
        (training and validation sets are scored again and again in a search); in-memory images never do."""
        extractor = self._extractor()
        if self.cache_features and images.paths is not None:
            return extract_features(extractor, images, feature_cache())
        return extractor.features_of(images)

    def _backbone_state(self) -> dict:
        """What identifies the backbone weights, saved with the model and checked on load."""
        return {"weights_identity": self._extractor().spec.weights.identity}

    def _shared_tensors(self) -> dict[str, np.ndarray]:
        """The int8 backbone as a uint8 array (safetensors holds arrays only; loading never parses it as code)."""
        if self.int8_backbone_ is None:
            return {}
        return {INT8_BACKBONE_TENSOR: np.frombuffer(self.int8_backbone_, dtype=np.uint8)}

    def _restore_shared(self, tensors: dict[str, np.ndarray]) -> None:
        stored = tensors.pop(INT8_BACKBONE_TENSOR, None)
        self.int8_backbone_ = None if stored is None else stored.tobytes()
        if (self._precision() == "int8") != (stored is not None):
            raise AutomlAdError(f"{self.name}: the saved state {'has' if stored is not None else 'lacks'} an int8 "
                                f"backbone but precision is {self._precision()!r}; the model files do not match")

    def _check_backbone(self, state: dict) -> None:
        identity = self._extractor().spec.weights.identity
        if state.get("weights_identity") not in (None, identity):
            raise AutomlAdError(f"{self.name}: the model was fitted with backbone weights {state['weights_identity']}"
                                f" but {identity} are loaded now; pass the same weights file")

