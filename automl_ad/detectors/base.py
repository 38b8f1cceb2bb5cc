"""The detector contract every method family follows (scikit-learn parameters, PyOD score direction).

* ``__init__`` only stores keyword arguments (``self._store_parameters(locals())``), so ``get_params``/
  ``set_params``/``sklearn.base.clone`` work and a search can construct any configuration; defaults live in each
  family's ``__init__`` signature.
* ``_parameter_constraints`` declares what every constructor parameter accepts (see ``parameters.py``);
  ``fit`` and ``score_samples`` check them first and raise :class:`~automl_ad.errors.InvalidParameterError`.
* ``fit(train) -> self`` on normal images; fitted attributes end in ``_`` and are declared on :class:`Detector`
  (``fit_seconds_``, ``fit_peak_rss_mb_`` and ``n_train_`` record the fit; ``loss_history_`` and
  ``epochs_trained_`` the training of iterative families). Scoring costs are measured by the evaluation
  (``automl_ad.evaluation.run.measure_costs``), not by the detector.
* ``score_samples(images) -> Scores``: image scores ``(N,)`` and anomaly maps ``(N, H, W)`` or None; higher =
  more anomalous (PyOD's direction; scikit-learn's outlier detectors use the opposite sign). Calling it before
  ``fit`` raises :class:`NotFittedError`. ``score`` is a deprecated alias. ``_score`` returns one row per network
  input (one per image for a squash, every family's default; one per tile for tiles) and
  :meth:`Detector.per_image_scores` brings them back to each image's aspect, at its full resolution or at most
  ``SCORE_MAP_PIXELS`` (images of different sizes: every map at the most common size).
* ``save(dir)`` / ``Detector.load(dir)``: arrays in safetensors, everything else in JSON — never pickle.
* ``inference_graph()``: for families whose inference is plain torch, the module ``score_samples`` runs (see
  ``graph_based.py``), from the preprocessed batch of :meth:`Detector.graph_input` on (exported as ONNX in
  packages); None otherwise, with :meth:`Detector.graph_absent_reason` saying why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from automl_ad.data.geometry import Geometry, map_shape, stitch
from automl_ad.data.imageset import ImageSet
from automl_ad.data.io import resize_image
from automl_ad.defaults import SCORE_MAP_PIXELS
from automl_ad.detectors.parameters import check_parameters
from automl_ad.errors import AutomlAdError, InvalidParameterError
from automl_ad.version import __version__

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

SAVE_FORMAT = 1
_PARAMS_FILE, _TENSORS_FILE = "detector.json", "tensors.safetensors"

#: Called by iterative families after each epoch with (epoch, metrics); returning True stops training. metrics
#: holds "loss" and, for families that can score mid-training, "score" (images -> Scores with current weights).
EpochCallback = Callable[[int, dict], "bool | None"]


class NotFittedError(AutomlAdError, SklearnNotFittedError):
    """``score_samples``/``save`` was called before ``fit``."""


class NotApplicableError(AutomlAdError):
    """The method cannot work on this data (e.g. template matching on images that do not align)."""


@dataclass
class Scores:
    """Detector output: higher = more anomalous."""

    image_scores: np.ndarray
    anomaly_maps: np.ndarray | None = None


class Detector(BaseEstimator):
    """Base class. Subclasses implement ``_fit``, ``_score``, ``_state`` and ``_restore``; families whose
    inference is a torch graph derive from ``graph_based.GraphDetector``, whose ``_score`` runs that graph."""

    name: ClassVar[str] = ""
    route: ClassVar[str] = ""
    supports_localization: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True
    iterative: ClassVar[bool] = False
    #: Synthetic anomaly kinds (``automl_ad.data.synthetic.KINDS``) the family trains on: never ranked on them.
    trains_on_anomalies: ClassVar[tuple[str, ...]] = ()
    #: Cheap settings for the contract test (tiny images, few epochs); merged over the defaults.
    test_params: ClassVar[dict] = {}
    #: Which built-in demo category the contract test fits this family on ("object" or "texture").
    test_category: ClassVar[str] = "object"
    #: Why the family has no inference graph (see :meth:`inference_graph`).
    no_graph: ClassVar[str] = "its inference is not a plain torch graph"
    #: Constructor parameter -> list of constraints, one of which its value must meet (see ``parameters.py``).
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    #: True while ``_score`` runs mid-training, under :meth:`_interim_state` (the weights change every epoch).
    _scoring_mid_training: bool = False
    #: While ``_fit`` runs: the ``time.monotonic()`` by which a family with an anytime fit stops (see :meth:`fit`).
    _fit_deadline: float | None = None

    # --- attributes every family has ----------------------------------------------------------------------------
    #: Side in pixels images are resized to (square) before the family reads them; a constructor parameter.
    input_size: int
    #: Whether the family reads luma (one channel) rather than colour: a constructor parameter in families that
    #: offer the choice, a fixed class value otherwise.
    gray: bool = False

    # --- fitted attributes, set by fit and load -----------------------------------------------------------------
    fit_seconds_: float | None
    fit_peak_rss_mb_: float | None
    n_train_: int | None
    #: Mean training loss of each epoch (empty for families that do not train iteratively).
    loss_history_: list[float]
    #: Epochs run, early stopping included (None for families that do not train iteratively).
    epochs_trained_: int | None
    #: Whether an anytime fit stopped at its ``deadline`` with a smaller model than configured (see :meth:`fit`).
    fit_cut_by_time_: bool
    #: Seconds the last fit spent on the work :meth:`extra_fit_seconds` predicts (0 for families without any).
    fit_extra_seconds_: float = 0.0
    #: What the training images' 16-bit pixels were divided by (:attr:`ImageSet.full_scale`; None: 65535): every
    #: image it scores is read so.
    full_scale_: int | None = None

    # --- public API -------------------------------------------------------------------------------------------
    def fit(self, train: ImageSet, on_epoch: EpochCallback | None = None, deadline: float | None = None) -> Detector:
        """Fit on normal images. Iterative families call ``on_epoch`` after every epoch (which can stop them).
        ``deadline`` (a ``time.monotonic()`` value): a family whose fit is anytime stops there with the model it has
        and sets ``fit_cut_by_time_`` (PatchCore: the first k picks of its greedy coreset are the greedy coreset of
        k; iterative families: training ends with the batch during which it passed); the others ignore it."""
        from automl_ad.evaluation.cost import PeakRss

        self._validate_params()
        if len(train) == 0:
            raise ValueError(f"{self.name}: fit needs at least one normal image")
        if train.labels is not None and train.labels.any():
            raise ValueError(f"{self.name}: fit on normal images only ({int(train.labels.sum())} are labelled "
                             "anomalous); anomalous images belong in validation or test")
        self.loss_history_ = []
        self.fit_cut_by_time_ = False
        self.fit_extra_seconds_ = 0.0
        self.full_scale_ = train.full_scale
        start = time.perf_counter()
        self._fit_deadline = deadline
        try:
            with PeakRss() as memory:
                self._fit(train, on_epoch)
        finally:
            self._fit_deadline = None
        self.fit_seconds_ = time.perf_counter() - start
        self.fit_peak_rss_mb_ = memory.peak_mb
        self.n_train_ = len(train)
        self.epochs_trained_ = len(self.loss_history_) if self.iterative else None
        return self

    def score_samples(self, images: ImageSet) -> Scores:
        """Image scores and (if the family localises) anomaly maps for ``images``; higher = more anomalous."""
        self._check_fitted()
        self._validate_params()
        return self._checked_score(images)

    def score(self, images: ImageSet) -> Scores:
        """Deprecated alias of :meth:`score_samples` (scikit-learn's ``score(X, y)`` returns one number)."""
        warnings.warn(f"{type(self).__name__}.score(images) is deprecated and will be removed; use "
                      "score_samples(images)", DeprecationWarning, stacklevel=2)
        return self.score_samples(images)

    def _checked_score(self, images: ImageSet) -> Scores:
        """``_score`` with its output checked (shapes, finite values)."""
        if len(images) == 0:
            return Scores(np.zeros(0, np.float32), None)
        images = images.at_full_scale(self.full_scale_)
        raw = self._score(images)
        scores = self.per_image_scores(images, raw.image_scores, raw.anomaly_maps)
        image_scores = np.asarray(scores.image_scores, dtype=np.float32).reshape(-1)
        if image_scores.shape != (len(images),):
            raise RuntimeError(f"{self.name} returned {image_scores.shape} scores for {len(images)} images")
        if not np.isfinite(image_scores).all():
            raise FloatingPointError(f"{self.name} produced non-finite image scores (NaN/inf); the model diverged "
                                     "or the input is degenerate")
        maps = scores.anomaly_maps
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float32)
            if maps.ndim != 3 or len(maps) != len(images):
                raise RuntimeError(f"{self.name} returned maps of shape {maps.shape} for {len(images)} images")
            if not np.isfinite(maps).all():
                raise FloatingPointError(f"{self.name} produced non-finite anomaly maps (NaN/inf)")
        return Scores(image_scores, maps)

    def save(self, directory: str | Path) -> Path:
        """Write ``detector.json`` (family, parameters, state) and ``tensors.safetensors``; returns the folder."""
        from safetensors.numpy import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, state = self._state()
        tensors = {**tensors, **self._shared_tensors()}
        state = {**state, "loss_history": self.loss_history_, "epochs_trained": self.epochs_trained_}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / _TENSORS_FILE))
        record = {"format": SAVE_FORMAT, "automl_ad_version": __version__, "family": self.name,
                  "params": _jsonable(self.get_params()), "state": _jsonable(state),
                  "fit": {"seconds": self.fit_seconds_, "peak_rss_mb": self.fit_peak_rss_mb_, "n_train": self.n_train_,
                          "full_scale": self.full_scale_}}
        (directory / _PARAMS_FILE).write_text(json.dumps(record, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, params_file: str = _PARAMS_FILE, tensors_file: str = _TENSORS_FILE,
             overrides: dict | None = None) -> Detector:
        """Rebuild a saved detector (of any family when called on ``Detector``). Executes nothing from the files.
        ``overrides`` replaces saved parameters (e.g. where the backbone weights file is now)."""
        from safetensors.numpy import load_file

        from automl_ad.detectors.registry import detector_class

        directory = Path(directory)
        try:
            record = json.loads((directory / params_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AutomlAdError(f"{directory} is not a saved detector ({params_file}: {exc})") from exc
        if record.get("format") != SAVE_FORMAT:
            raise AutomlAdError(f"{directory}: saved with format {record.get('format')}, this version reads "
                                f"{SAVE_FORMAT}")
        family = detector_class(record["family"])
        if cls is not Detector and not issubclass(family, cls):
            raise AutomlAdError(f"{directory} holds a {record['family']} detector, not {cls.name}")
        detector = family(**_restore_tuples(family, {**record["params"], **(overrides or {})}))
        try:
            detector._validate_params()
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{directory / params_file}: {exc}") from exc
        state = record["state"]
        detector.loss_history_ = list(state.get("loss_history", []))
        detector.epochs_trained_ = state.get("epochs_trained")
        tensors = load_file(str(directory / tensors_file))
        detector._restore_shared(tensors)
        detector._restore(tensors, state)
        fit = record.get("fit", {})
        detector.fit_seconds_, detector.fit_peak_rss_mb_ = fit.get("seconds"), fit.get("peak_rss_mb")
        detector.n_train_ = fit.get("n_train")
        detector.full_scale_ = fit.get("full_scale")
        if detector.full_scale_ is not None and not (isinstance(detector.full_scale_, int)
                                                     and 255 <= detector.full_scale_ <= 65535):
            raise AutomlAdError(f"{directory / params_file}: fit.full_scale must be a whole number in 255-65535 or "
                                f"null, not {detector.full_scale_!r}")
        return detector

    def inference_graph(self) -> torch.nn.Module | None:
        """A torch module (on the CPU) mapping :meth:`graph_input`'s batch (float32 NCHW in [0, 1]) to
        ``(image_scores (N,), anomaly_maps (N, H, W))``: the computation ``score_samples`` runs, or None when the
        family has none. It may share the detector's own (eval-mode) modules: use it for inference or export only."""
        return None

    def int8_inference_model(self, graph: torch.nn.Module, example: np.ndarray, input_name: str,
                             output_names: tuple[str, str]) -> tuple[bytes, str] | None:
        """(the int8 ONNX model of :meth:`inference_graph` ``graph``, what its quantisation is in words) for a
        detector fitted at ``precision="int8"``; None here (fp32: the package exports ``graph`` as it is)."""
        return None

    def graph_absent_reason(self) -> str:
        """Why :meth:`inference_graph` is None for this detector."""
        return f"{self.name}: {self.no_graph}"

    def input_geometry(self) -> Geometry | None:
        """How images become network inputs; None: each image squashed to ``input_size`` x ``input_size``, one
        input per image (what every family does unless a backbone family is given a ``geometry``)."""
        return None

    def network_pixels(self, images: ImageSet, gray: bool = False) -> np.ndarray:
        """The network inputs of :meth:`input_geometry` as float32 (M, h, w[, 3]) in [0, 1], in image order."""
        geometry = self.input_geometry()
        return images.load(self.input_size, gray=gray) if geometry is None else images.network_inputs(geometry, gray)

    def graph_input(self, images: ImageSet) -> np.ndarray:
        """The inference graph's input for ``images``: float32 (M, C, h, w) in [0, 1], the network inputs of
        :meth:`input_geometry` (M = N for a squash or letterbox; every tile of every image for tiles) as
        ``score_samples`` reads them; C = 1 (luma) for families reading gray images, else 3 (gray repeated).
        :meth:`per_image_scores` turns the graph's per-input outputs into per-image scores and maps. 16-bit images
        are read at the training images' full scale, as ``score_samples`` reads them."""
        gray = bool(self.gray)
        pixels = self.network_pixels(images.at_full_scale(self.full_scale_), gray=gray)
        return np.ascontiguousarray(pixels[:, None] if gray else pixels.transpose(0, 3, 1, 2), dtype=np.float32)

    def per_image_scores(self, images: ImageSet, input_scores: np.ndarray,
                         input_maps: np.ndarray | None) -> Scores:
        """Per-image scores from per-network-input outputs (of ``_score`` or of the inference graph on
        :meth:`graph_input`). Each image's score is the largest of its inputs' scores (a squash or letterbox has
        one) and its map is :func:`~automl_ad.data.geometry.stitch`-ed back to the image's aspect (overlaps
        averaged, padding cropped) at its full resolution or at most ``SCORE_MAP_PIXELS``
        (:func:`~automl_ad.data.geometry.map_shape`): whatever the geometry, the same image gets a map of the same
        shape. When images differ in size every map is resized to the most common shape, so that ``anomaly_maps``
        stays one (N, H, W) array (metrics resize masks to their map)."""
        geometry = self.input_geometry()
        input_scores = np.asarray(input_scores, dtype=np.float32).reshape(-1)
        if geometry is None:  # the default squash to input_size: one input per image
            if len(input_scores) != len(images):
                raise RuntimeError(f"{self.name} returned {len(input_scores)} scores for {len(images)} images")
            if input_maps is None:
                return Scores(input_scores, None)
            maps = [resize_image(np.asarray(m, np.float32), map_shape(hw, SCORE_MAP_PIXELS))
                    for m, hw in zip(input_maps, images.sizes())]
            image_scores = input_scores
        else:
            grids = images.grids(geometry)
            counts = [grid.n_tiles for grid in grids]
            if len(input_scores) != sum(counts):
                raise RuntimeError(f"{self.name} returned {len(input_scores)} scores for {sum(counts)} network "
                                   f"inputs of {len(images)} images ({geometry.describe()})")
            bounds = np.cumsum([0, *counts])
            image_scores = np.array([input_scores[a:b].max() for a, b in zip(bounds[:-1], bounds[1:])], np.float32)
            if input_maps is None:
                return Scores(image_scores, None)
            maps = [stitch(input_maps[a:b], grid, map_shape(grid.image_hw, SCORE_MAP_PIXELS))
                    for a, b, grid in zip(bounds[:-1], bounds[1:], grids)]
        shapes = [m.shape for m in maps]
        common = max(set(shapes), key=lambda shape: (shapes.count(shape), shape))
        return Scores(image_scores, np.stack([resize_image(m, common) for m in maps]))

    # --- hooks for families -----------------------------------------------------------------------------------
    def _check_parameter_relations(self) -> None:
        """Raise :class:`~automl_ad.errors.InvalidParameterError` when parameters that are each allowed do not
        fit together (e.g. a patch larger than the image); called after the declared constraints are checked."""

    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        raise NotImplementedError

    def _score(self, images: ImageSet) -> Scores:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Fitted arrays (saved in safetensors) and JSON-able fitted values (``save`` adds the training history)."""
        raise NotImplementedError

    def _restore(self, tensors: dict[str, np.ndarray], state: dict) -> None:
        raise NotImplementedError

    def _shared_tensors(self) -> dict[str, np.ndarray]:
        """Arrays saved for every family of a kind, besides ``_state``'s (the backbone families' int8 network)."""
        return {}

    def _restore_shared(self, tensors: dict[str, np.ndarray]) -> None:
        """Restore :meth:`_shared_tensors` and take them out of ``tensors`` (called by ``load`` before
        ``_restore``, which gets the family's own arrays only: a FastFlow saved at int8 failed to load, its
        state dict holding the int8 network)."""

    # --- helpers ----------------------------------------------------------------------------------------------
    @classmethod
    def extra_fit_seconds(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """Seconds a fit of ``params`` on ``train_images`` images of ``network_pixels`` spends on work that does not
        grow linearly with the images (0 here; PatchCore's coreset compares training patches with each other).
        The search's cost predictor adds it to the linear part it learns from measured trials, scaled by what fits
        measured (``fit_extra_seconds_``) against it: the estimate may be an upper bound."""
        return 0.0

    @classmethod
    def peak_memory_bytes(cls, train_images: int, network_pixels: float, params: dict) -> float:
        """Bytes a fit of ``params`` on ``train_images`` images of ``network_pixels`` holds at its peak (fitting, or
        building its scoring graph) in the arrays that grow with the configuration and the data, beyond a trial's
        libraries and network (0 here; PaDiM's Gaussians, PatchCore's training patches). The search does not start
        a trial that would not fit in the memory one trial has."""
        return 0.0

    @classmethod
    def scoring_pixels(cls, params: dict, pixels: float) -> float:
        """Pixels the network processes when ``params`` score an image that gives ``pixels`` network-input pixels:
        ``pixels`` here (one pass); a family that runs the network on many crops of its input says so (CutPaste's
        patches). The search's cost predictor counts a trial's work in these."""
        return pixels

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """scikit-learn's parameter names (the constructor's), read from its signature once per family: every
        ``score_samples`` validates the parameters, and the signature cost 0.2 ms of an STPM image's 17 ms."""
        return list(_constructor_parameters(cls))

    def _store_parameters(self, arguments: dict) -> None:
        """The body of every family's ``__init__`` (``self._store_parameters(locals())``): each constructor
        parameter kept as the attribute of its name, unchanged, as scikit-learn expects (``fit`` validates)."""
        for name in self._get_param_names():
            setattr(self, name, arguments[name])

    def _validate_params(self) -> None:
        """Check every constructor parameter against ``_parameter_constraints``, then their relations."""
        check_parameters(self.name, self._parameter_constraints, self.get_params(deep=False))
        self._check_parameter_relations()

    def _until_deadline(self, batches: Iterable[T]) -> Iterator[T]:
        """One epoch's ``batches``, ending after the batch during which the fit's deadline passed (that epoch is
        then the last: ``fit_cut_by_time_``), so that one long epoch cannot carry a search trial past its limit
        (checked only between epochs, CutPaste's default timed out with nothing to show)."""
        for batch in batches:
            yield batch
            if self._fit_deadline is not None and time.monotonic() > self._fit_deadline:
                self.fit_cut_by_time_ = True
                return

    def _record_epoch(self, epoch: int, loss: float, on_epoch: EpochCallback | None, hint: str,
                      interim: Callable[[], AbstractContextManager] | None = None) -> bool:
        """For iterative families: keep the epoch's mean loss in ``loss_history_``, raise if training diverged
        (``hint`` says what to lower), report to ``on_epoch``; True when the caller asks to stop, or (without
        reporting: the time is up) when the fit's deadline cut the epoch (:meth:`_until_deadline`).

        ``interim`` is a context manager factory under which ``_score`` works with the weights of this epoch
        (e.g. model in eval mode, then back to train mode). With it, the metrics passed to ``on_epoch`` carry
        ``"score"``: a function scoring images with the current weights, so a search can report intermediate
        quality and stop poor trials early.
        """
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.name}: the training loss became {loss} at epoch {epoch}; {hint}")
        self.loss_history_.append(loss)
        log.debug("%s: epoch %d loss %.5f", self.name, epoch, loss)
        if self.fit_cut_by_time_:
            log.warning("%s: training stopped by the time limit during epoch %d", self.name, epoch + 1)
            return True
        if on_epoch is None:
            return False
        metrics: dict = {"loss": loss}
        if interim is not None:
            def score_now(images: ImageSet) -> Scores:
                with interim():
                    return self._checked_score(images)
            metrics["score"] = score_now
        return bool(on_epoch(epoch, metrics))

    @contextlib.contextmanager
    def _interim_state(self, modules: Sequence = (), **attributes):
        """Mid-training scoring state for ``_record_epoch``'s ``interim``: ``modules`` in eval mode and
        ``attributes`` set as ``_score`` expects them after fit; afterwards the modules return to the mode they
        were in and the attributes are removed. The detector counts as fitted meanwhile (its public helpers work)
        and ``_scoring_mid_training`` is True."""
        attributes = {**attributes, "_scoring_mid_training": True}
        if not hasattr(self, "fit_seconds_"):
            attributes["fit_seconds_"] = None
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        self.__dict__.update(attributes)
        try:
            yield
        finally:
            for name in attributes:
                self.__dict__.pop(name, None)
            for module, training in zip(modules, modes):
                module.train(training)

    def _check_fitted(self) -> None:
        if not hasattr(self, "fit_seconds_"):
            raise NotFittedError(f"this {self.name} detector is not fitted yet; call fit(train) first")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return
        if not cls.route:
            raise TypeError(f"detector family {cls.__name__} must declare its route")
        params, declared = set(cls._get_param_names()), set(cls._parameter_constraints)
        if params != declared:
            raise TypeError(f"detector family {cls.__name__}: _parameter_constraints must cover exactly its "
                            f"constructor parameters (undeclared: {sorted(params - declared)}, not parameters: "
                            f"{sorted(declared - params)})")


@functools.cache
def _constructor_parameters(family: type) -> tuple[str, ...]:
    return tuple(BaseEstimator._get_param_names.__func__(family))


def _restore_tuples(family: type, params: dict) -> dict:
    """JSON turns tuples into lists; give back tuples where the family's default is a tuple."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(family.__init__).parameters.items()}
    return {k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v
            for k, v in params.items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
