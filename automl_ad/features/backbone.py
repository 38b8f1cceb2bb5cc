"""Pretrained timm backbones as feature pyramids, with weights from the hub cache or a local file.

A :class:`FeatureExtractor` selects feature maps by stride (e.g. ``(8, 16)``: the two mid stages of any timm
CNN), normalises inputs with the weights' own mean/std, runs on CUDA when present (``device="auto"``) and, on
CPU through ONNX Runtime (:mod:`automl_ad.features.runtime`), which gives the same features several times faster
than eager execution.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from automl_ad.data.geometry import Geometry
from automl_ad.defaults import BUILTIN_BACKBONE, BUILTIN_WEIGHTS_FILE, FEATURE_CHUNK_IMAGES
from automl_ad.errors import AutomlAdError, InvalidParameterError, UsageError
from automl_ad.features.quantize import model_digest
from automl_ad.features.runtime import SETUP_TIME, cpu_runner, onnx_model_runner

log = logging.getLogger(__name__)


class BackboneWeightsError(UsageError):
    """Pretrained weights cannot be found, or a weights file cannot be used (missing, not a weights file, truncated,
    another network's); the message names the file and says how to provide weights. A configuration problem: exit
    code 2."""


class UnknownBackboneError(InvalidParameterError):
    """``backbone`` is not the name of a timm model (exit code 2); the message lists the usual ones."""


#: timm's model-name prefixes that name a source (the Hugging Face hub, a local folder) rather than an architecture.
_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_backbone_name(backbone, family: str | None = None) -> None:
    """Raise :class:`UnknownBackboneError` unless ``backbone`` names a timm model (``timm.list_models()``, with or
    without a pretrained tag such as ``resnet18.a1_in1k``; a ``hf-hub:`` or ``local-dir:`` source is passed on)."""
    import timm

    if isinstance(backbone, str) and (backbone.startswith(_SOURCE_PREFIXES) or timm.is_model(backbone)):
        return
    close = difflib.get_close_matches(str(backbone), timm.list_models(), n=3) if isinstance(backbone, str) else []
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"{family + ': ' if family else ''}unknown backbone {backbone!r}: it is not the name of a timm model.{hint} "
        f"Backbones automl-ad knows weights for: {', '.join(_searched_backbones())}; any other name that "
        "timm.list_models() lists works too, with its pretrained weights (--weights FILE offline).")


def _searched_backbones() -> list[str]:
    """The backbones automl-ad knows weights for (the built-in one first), for messages."""
    return [BUILTIN_BACKBONE, *sorted({p["model"] for p in known_weights().values()} - {BUILTIN_BACKBONE})]


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; explicit names are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutomlAdError(f"device={device!r} was requested but no CUDA GPU is available; use device='auto' or 'cpu'")
    return device


@lru_cache(maxsize=64)
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def known_weights() -> dict:
    """Weight files whose creation arguments and normalisation we know, keyed by sha256 (``weights.yaml``)."""
    return yaml.safe_load(resources.files("automl_ad.features").joinpath("weights.yaml").read_text())["weights"]


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from and how inputs must be normalised for them."""

    identity: str  # sha256 of the file, "hub:<id>", or "random"
    file: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    create_kwargs: tuple = ()  # sorted (name, value) pairs for timm.create_model


def _hub_cached_file(pretrained_cfg: dict) -> str | None:
    """A weights file for this timm config already in the Hugging Face or torch hub cache, if any."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                return cached
    url = pretrained_cfg.get("url")
    if url:
        import torch.hub

        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def hub_weights_cached(backbone: str) -> bool:
    """Whether pretrained weights for timm model ``backbone`` are already in the local hub cache."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    return cfg is not None and _hub_cached_file(cfg.to_dict()) is not None


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (weights can be downloaded); False when offline is declared."""
    import socket

    if _offline():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_weights(backbone: str, weights: str | None, pretrained: bool,
                    mean=None, std=None, create_kwargs: dict | None = None) -> WeightsSource:
    """Decide where weights come from: ``weights`` (a local file), else the hub cache, else the hub, else (for
    the built-in backbone, offline) the weights shipped with automl-ad. Explicit ``mean``/``std``/
    ``create_kwargs`` override known presets."""
    import timm

    check_backbone_name(backbone)
    create_kwargs = dict(create_kwargs or {})
    cfg = timm.models.get_pretrained_cfg(backbone)
    cfg = cfg.to_dict() if cfg is not None else {}
    default_mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    default_std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if weights is not None:
        return _file_source(Path(weights).expanduser(), backbone, mean or default_mean, std or default_std,
                            create_kwargs, explicit_norm=(mean, std))
    if not pretrained:
        return WeightsSource("random", None, tuple(mean or default_mean), tuple(std or default_std),
                             _pairs(create_kwargs))
    cached = _hub_cached_file(cfg)
    if cached is None and uses_builtin_weights(backbone):
        log.warning("no hub access and no local weights for %s: using the built-in ImageNet weights shipped with "
                    "automl-ad", backbone)
        return _file_source(builtin_weights_file(), backbone, default_mean, default_std, create_kwargs,
                            explicit_norm=(mean, std))
    if cached is None and _offline():
        raise BackboneWeightsError(_offline_message(backbone))
    identity = f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or backbone}"
    return WeightsSource(identity, cached, tuple(mean or default_mean), tuple(std or default_std),
                         _pairs(create_kwargs))


def _file_source(path: Path, backbone: str, default_mean, default_std, create_kwargs: dict,
                 explicit_norm: tuple) -> WeightsSource:
    """A local weights file (checked by :func:`check_weights_file`); known files (``weights.yaml``) bring their own
    creation arguments and mean/std."""
    check_weights_file(path, backbone)
    identity = file_sha256(str(path.resolve()))
    preset = known_weights().get(identity, {})
    mean, std = explicit_norm
    return WeightsSource(identity, str(path.resolve()), tuple(mean or preset.get("mean", default_mean)),
                         tuple(std or preset.get("std", default_std)),
                         _pairs({**preset.get("create_kwargs", {}), **create_kwargs}))


def builtin_weights_file() -> Path:
    """The ImageNet weights of :data:`~automl_ad.defaults.BUILTIN_BACKBONE` shipped inside the package."""
    return Path(str(resources.files("automl_ad.features").joinpath("builtin", BUILTIN_WEIGHTS_FILE)))


def uses_builtin_weights(backbone: str) -> bool:
    """Whether ``backbone`` (no local file given) would run on the built-in weights: it is the built-in
    backbone, its weights are not in the hub cache, and the hub cannot be reached."""
    return backbone == BUILTIN_BACKBONE and not hub_weights_cached(backbone) and (_offline() or not hub_reachable())


def weights_available(backbone: str) -> bool:
    """Pretrained weights for ``backbone`` are on this machine (hub cache, or built in)."""
    return backbone == BUILTIN_BACKBONE or hub_weights_cached(backbone)


def backbone_fallback(family: str, backbone: str, local: dict[str, str] | None = None) -> tuple[dict, str] | None:
    """When ``family``'s default ``backbone`` cannot run here (no local file for it in ``local``, backbone name →
    weights file such as a profile's ``backbone_weights``; no weights in the hub cache; the hub unreachable): the
    parameters that run :data:`~automl_ad.defaults.BUILTIN_BACKBONE` instead, and a note saying so and which weights
    it runs on: the file ``local`` names for it, else the ImageNet weights built into automl-ad. None when the
    default can run, or when no weights for the built-in backbone are here either."""
    local = local or {}
    if backbone in local or weights_available(backbone) or (not _offline() and hub_reachable()):
        return None
    why = f"no weights for {family}'s default backbone {backbone} here and the hub is unreachable: using"
    other = "(--weights FILE or --param backbone=... for another)"
    own = local.get(BUILTIN_BACKBONE)
    if own:
        check_weights_file(own, BUILTIN_BACKBONE)
        return ({"backbone": BUILTIN_BACKBONE, "weights": own},
                f"{why} {BUILTIN_BACKBONE} with your weights {own}, from the profile's backbone_weights {other}")
    if uses_builtin_weights(BUILTIN_BACKBONE):
        return ({"backbone": BUILTIN_BACKBONE},
                f"{why} {BUILTIN_BACKBONE} with the ImageNet weights built into automl-ad {other}")
    return None


def backbone_of_weights(path: str | Path) -> str | None:
    """The timm model a known weights file (``weights.yaml``, by sha256) belongs to; None when unknown. A file that
    is missing or no weights file raises :class:`BackboneWeightsError` (:func:`check_weights_file`)."""
    return check_weights_file(path)


#: How to make a weights file automl-ad can use; the end of every message about an unusable one.
WEIGHTS_FILE_HINT = ("Pass a timm state_dict, saved with safetensors.torch.save_file(model.state_dict(), "
                     "'FILE.safetensors') or torch.save(model.state_dict(), 'FILE.pth') where model = MODEL.")
#: The largest safetensors header the safetensors library reads (its own limit).
_SAFETENSORS_MAX_HEADER = 100 << 20
_ZIP_MAGIC = b"PK\x03\x04"


def check_weights_file(path: str | Path, backbone: str | None = None) -> str | None:
    """Check, without loading it, that ``path`` is a weights file timm can load: a name ending in ``.safetensors``
    needs a valid safetensors header whose tensors the file holds in full; any other name a PyTorch ``torch.save``
    file (timm tells them apart by the name). Return the timm model a known file (``weights.yaml``, by sha256)
    belongs to, None when unknown; with ``backbone``, a known file of another model is refused. Every problem
    raises :class:`BackboneWeightsError` naming the file, what is wrong with it and what to do. The one check of
    every place that accepts weights (``--weights``, a profile's ``backbone_weights``, a detector's ``weights``)."""
    path = Path(path).expanduser()
    try:
        if not path.exists():
            raise BackboneWeightsError(f"weights file {path} does not exist. {_hint(backbone)}")
        if not path.is_file():
            raise BackboneWeightsError(f"weights file {path} is not a file (a folder?). {_hint(backbone)}")
        problem = _weights_file_problem(path)
    except OSError as exc:
        raise BackboneWeightsError(f"weights file {path} cannot be read ({exc.strerror or exc})") from exc
    if problem:
        raise BackboneWeightsError(f"weights file {path} {problem}. {_hint(backbone)}")
    preset = known_weights().get(file_sha256(str(path.resolve())))
    model = preset["model"] if preset else None
    if backbone is not None and model is not None and model != backbone:
        raise BackboneWeightsError(f"weights file {path} holds {model} weights, not {backbone}; "
                                   f"use backbone={model} with it")
    return model


def _hint(backbone: str | None) -> str:
    return WEIGHTS_FILE_HINT.replace("MODEL", f"timm.create_model('{backbone}')" if backbone else
                                     "timm.create_model(<its backbone>)")


def _weights_file_problem(path: Path) -> str | None:
    """What makes ``path`` no weights file timm can load (None: nothing found). Reads headers only."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): not a weights file, or a copy or download that was cut off"
    with open(path, "rb") as handle:
        head = handle.read(9)
    safetensors_name = path.name.lower().endswith(".safetensors")
    if head[8:9] == b"{":  # 8 bytes of header length, then the JSON header
        problem = _safetensors_problem(path, size)
        if problem is None and not safetensors_name:
            return ("is a safetensors file, but its name does not end in .safetensors (timm reads such files with "
                    "torch.load): rename it to end in .safetensors")
        return problem
    zipped = head.startswith(_ZIP_MAGIC)
    if zipped or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):  # torch.save
        if safetensors_name:
            return ("is a PyTorch torch.save file, not a safetensors file, but its name ends in .safetensors: "
                    "rename it to end in .pth")
        return _torch_file_problem(path) if zipped else None
    what = _describe_content(path) or (f"only {size} bytes" if size < 64 else "")
    if safetensors_name:
        return "is not a safetensors file (it does not start with a safetensors header" + (f"; {what})" if what
                                                                                          else ")")
    return "is neither a PyTorch (torch.save) nor a safetensors weights file" + (f" ({what})" if what else "")


def _torch_file_problem(path: Path) -> str | None:
    """What is wrong with a zip archive that should be a ``torch.save`` file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return ("is a damaged or truncated PyTorch file (its zip directory cannot be read): a copy or download that "
                "was cut off?")
    if not any(name.endswith("data.pkl") for name in names):
        return "is a zip archive, but not a PyTorch torch.save file (it has no data.pkl)"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with ``path`` as a safetensors file (None: a valid header, all its tensors in the file)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > _SAFETENSORS_MAX_HEADER:
            return (f"has an invalid safetensors header (it claims {length} bytes, over the "
                    f"{_SAFETENSORS_MAX_HEADER} a safetensors header may have)")
        if 8 + length > size:
            return (f"is truncated: its safetensors header alone should take {length} bytes but the file has "
                    f"{size - 8} after the header length (a copy or download that was cut off?)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"has an invalid safetensors header (not JSON: {exc})"
    if not isinstance(header, dict):
        return "has an invalid safetensors header (not a JSON object)"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"has an invalid safetensors header (tensor {name!r} has no valid data_offsets)"
        ends.append(offsets[1])
    if not ends:
        return "holds no tensors"
    needed = 8 + length + max(ends)
    if needed > size:
        return (f"is truncated: its safetensors header describes {needed} bytes of tensors but the file has only "
                f"{size} (a copy or download that was cut off?)")
    try:  # the library's own validation (dtypes, shapes, overlaps), still without reading the tensors
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # noqa: BLE001 - SafetensorError, with the library's reason
        return f"has an invalid safetensors header ({exc})"
    return None


def _describe_content(path: Path) -> str:
    """A word on what a file that is no weights file seems to hold (text, an image), or ''."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")):
        return "it is an image"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the end of the sample
            return ""
    return "it holds text"


def _pairs(kwargs: dict) -> tuple:
    return tuple(sorted(kwargs.items()))


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "AUTOML_AD_OFFLINE"))


def _offline_message(backbone: str) -> str:
    return (f"no pretrained weights for backbone '{backbone}' are available offline (not in the Hugging Face or "
            f"torch hub cache). Provide them in one of these ways: pass a local timm state_dict file with "
            f"--weights PATH (Python: weights='PATH'); or run once with internet access so timm caches them; "
            f"or copy the hub cache (~/.cache/huggingface) from a connected machine. pretrained=False uses random "
            f"weights (much lower accuracy).")


def _unloaded_weights(model, start) -> tuple[list[str], int]:
    """The weight tensors of ``model`` (built from a weights file under seed 0, as :class:`FeatureExtractor` does)
    that still hold their random initialisation, the one of ``start`` (the same network built without weights
    under seed 0), so the file had none for them; and how many were compared. Only randomly initialised tensors
    are compared (a constant start, e.g. a norm layer's ones, proves nothing)."""
    import torch

    reference = dict(start.named_parameters())
    unloaded, total = [], 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            initial = reference.get(name)
            if initial is None or initial.shape != parameter.shape or initial.numel() < 2 \
                    or not bool(initial.std() > 0):
                continue
            total += 1
            if torch.equal(parameter.detach().cpu(), initial):
                unloaded.append(name)
    return unloaded, total


def _file_load_message(spec: BackboneSpec, exc: Exception) -> str:
    """Why the weights file of ``spec`` did not load into its backbone, and what to do."""
    file, backbone = spec.weights.file, spec.backbone
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, RuntimeError) and "state_dict" in str(exc):
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        return (f"weights file {file} does not fit backbone {backbone} ({reason[:200]} {detail[:300]}): it holds "
                f"another network's weights. Use backbone=<the timm model it was saved from> with it, or pass a "
                f"state_dict of timm.create_model('{backbone}').")
    return (f"weights file {file} could not be loaded into backbone {backbone} ({type(exc).__name__}: "
            f"{reason[:300]}). {_hint(backbone)}")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines the features: part of every feature-cache key. ``geometry`` (None: a squash
    to ``input_size``) says how images become network inputs; features come one row per network input."""

    backbone: str
    strides: tuple[int, ...]
    weights: WeightsSource
    input_size: int
    #: sha256 of the int8 quantised network (:mod:`automl_ad.features.quantize`) that replaces the fp32 one, if any.
    int8_model: str | None = None
    geometry: Geometry | None = None

    @property
    def input_hw(self) -> tuple[int, int]:
        """The network input (height, width)."""
        return self.geometry.input_hw if self.geometry is not None else (self.input_size, self.input_size)

    def key(self) -> dict:
        precision = {"precision": "fp32"} if self.int8_model is None else \
            {"precision": "int8", "int8_model": self.int8_model}
        return {"backbone": self.backbone, "strides": list(self.strides), "weights": self.weights.identity,
                "mean": list(self.weights.mean), "std": list(self.weights.std),
                "create_kwargs": dict(self.weights.create_kwargs), "input_size": self.input_size,
                "geometry": None if self.geometry is None else self.geometry.key(),
                "resize": "bilinear-antialias", "channels": "rgb", **precision}


class FeatureExtractor:
    """A timm feature pyramid at the given strides, ready for inference on ``device``."""

    def __init__(self, spec: BackboneSpec, device: str = "auto"):
        import timm
        import torch

        from automl_ad.features.same_padding import fix_same_padding

        self.spec = spec
        self.device = resolve_device(device)
        kwargs = dict(features_only=True, **dict(spec.weights.create_kwargs))
        pretrained = spec.weights.identity != "random"
        if spec.weights.file:
            kwargs["pretrained_cfg_overlay"] = dict(file=spec.weights.file)
        loading = False  # the weights, after the architecture was checked
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.random.fork_rng(devices=[]):  # seed 0, as the model below: its random start
                    torch.manual_seed(0)
                    probe = timm.create_model(spec.backbone, pretrained=False, **{
                        k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"})
                reductions = probe.feature_info.reduction()
                missing = [s for s in spec.strides if s not in reductions]
                if missing:
                    raise AutomlAdError(f"backbone {spec.backbone} has feature strides {reductions}; "
                                        f"{missing} are not among them")
                kwargs["out_indices"] = tuple(reductions.index(s) for s in spec.strides)
                # Random weights are drawn from a fixed seed, so every process gets the same network and the
                # feature cache (keyed "random") stays valid across processes.
                loading = True
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    model = timm.create_model(spec.backbone, pretrained=pretrained, **kwargs)
        except AutomlAdError:
            raise
        except Exception as exc:
            if loading and pretrained and spec.weights.file:  # a file (checked by check_weights_file) did not load
                raise BackboneWeightsError(_file_load_message(spec, exc)) from exc
            if isinstance(exc, RuntimeError) and ("no Internet" in str(exc) or "connection" in str(exc).lower()):
                raise BackboneWeightsError(_offline_message(spec.backbone)) from exc
            if isinstance(exc, (OSError, ValueError)):
                raise BackboneWeightsError(f"{_offline_message(spec.backbone)} (loader said: {exc})") from exc
            raise
        drop_unused_blocks(model)
        if pretrained and spec.weights.file and not spec.weights.identity.startswith("hub:") \
                and spec.weights.identity not in known_weights():
            # timm loads a user's file leniently into a feature network: tensors it lacks stay random, silently
            unloaded, total = _unloaded_weights(model, probe)
            if unloaded:
                raise BackboneWeightsError(
                    f"weights file {spec.weights.file} does not fit backbone {spec.backbone}: it lacks {len(unloaded)} "
                    f"of the {total} weight tensors the backbone needs (e.g. {', '.join(unloaded[:3])}), which would "
                    f"stay random. It holds another network's weights, or names them differently. Use backbone=<the "
                    f"timm model it was saved from> with it, or pass a state_dict of "
                    f"timm.create_model('{spec.backbone}') (its classifier may stay in).")
        fix_same_padding(model)  # constant padding in exported graphs
        self.channels = tuple(model.feature_info.channels())
        self.model = model.eval().to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._mean = torch.tensor(spec.weights.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.weights.std, device=self.device).view(1, 3, 1, 1)
        self._graph = None
        #: The int8 network (ONNX bytes) that runs instead of ``model`` (see :meth:`quantised`); None: fp32.
        self.int8_model: bytes | None = None

    def quantised(self, model: bytes) -> FeatureExtractor:
        """This extractor running the int8 network ``model`` (from :func:`~automl_ad.features.quantize.
        quantise_backbone`) through ONNX Runtime on CPU; its spec, so its feature-cache key, names that network."""
        if self.device != "cpu":
            raise AutomlAdError(f"an int8 backbone runs on CPU through ONNX Runtime, not on {self.device}")
        int8 = copy.copy(self)
        int8.spec = dataclasses.replace(self.spec, int8_model=model_digest(model))
        int8.int8_model = model
        int8._graph = onnx_model_runner(model)
        return int8

    def normalise(self, images: np.ndarray):
        """(N, H, W, 3) float in [0, 1] → normalised NCHW tensor on the device."""
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
        return (batch - self._mean) / self._std

    def _runner(self):
        """The network as a fast CPU runner (ONNX Runtime, see :mod:`automl_ad.features.runtime`), eager on GPU."""
        import torch

        if self.device != "cpu":
            return lambda batch: list(self.model(batch))
        if self._graph is None:
            self._graph = cpu_runner(self.model, torch.zeros(1, 3, *self.spec.input_hw))
        return self._graph

    def __call__(self, batch) -> list:
        """Feature maps (list of NCHW tensors) for a normalised batch."""
        import torch

        with torch.inference_mode():
            return self._runner()(batch)

    @property
    def batch_size(self) -> int:
        """Batch size for bulk extraction: 1 on CPU (the frozen graph is fastest per image there), 32 on GPU."""
        return 1 if self.device == "cpu" else 32

    def features(self, images: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        """Feature maps as float32 numpy arrays for (N, H, W, 3) network inputs in [0, 1]."""
        batch_size = batch_size or self.batch_size
        outputs: list[list[np.ndarray]] = [[] for _ in self.spec.strides]
        for start in range(0, len(images), batch_size):
            for level, feature in enumerate(self(self.normalise(images[start:start + batch_size]))):
                outputs[level].append(feature.float().cpu().numpy())
        return [level[0] if len(level) == 1 else np.concatenate(level) for level in outputs]

    def features_of(self, images) -> list[np.ndarray]:
        """Feature maps of an :class:`~automl_ad.data.imageset.ImageSet`, one row per network input of the spec's
        geometry (per image for a squash or letterbox, per tile for tiles), decoding ``FEATURE_CHUNK_IMAGES``
        images at a time (a large training set is never held as pixels at once)."""
        levels: list[list[np.ndarray]] = []
        for start in range(0, len(images), FEATURE_CHUNK_IMAGES):
            chunk = images.subset(range(start, min(start + FEATURE_CHUNK_IMAGES, len(images))))
            geometry = self.spec.geometry
            features = self.features(chunk.load(self.spec.input_size) if geometry is None
                                     else chunk.network_inputs(geometry))
            levels = levels or [[] for _ in features]
            for level, feature in zip(levels, features):
                level.append(feature)
        return [level[0] if len(level) == 1 else np.concatenate(level) for level in levels]


@lru_cache(maxsize=16)
def _feature_info(backbone: str):
    """timm's feature info of ``backbone``, read from its architecture alone (built on the meta device: no weights,
    no memory, milliseconds)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False, features_only=True).feature_info


def _stride_indices(backbone: str, strides: tuple[int, ...]) -> tuple[int, ...]:
    """The indices of ``backbone``'s feature maps at ``strides``; unknown strides raise ``ValueError``."""
    reductions = _feature_info(backbone).reduction()
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f"backbone {backbone} has feature strides {reductions}; {missing} are not among them")
    return tuple(reductions.index(s) for s in strides)


@lru_cache(maxsize=16)
def feature_channels(backbone: str, strides: tuple[int, ...]) -> tuple[int, ...]:
    """Channels of ``backbone``'s feature maps at ``strides``, read from its architecture alone. Unknown strides
    raise ``ValueError``."""
    channels = _feature_info(backbone).channels()
    return tuple(channels[i] for i in _stride_indices(backbone, strides))


@lru_cache(maxsize=16)
def activation_values(backbone: str, strides: tuple[int, ...]) -> float:
    """Values per input pixel that the layers of ``backbone``'s feature network for ``strides`` output in all (every
    leaf module's output; the blocks after the deepest stride dropped, as trained), counted on the meta device. A
    network trained through them keeps about one float32 each for the backward pass. Unknown strides raise
    ``ValueError``."""
    import timm
    import torch

    indices = _stride_indices(backbone, strides)
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=indices)
    drop_unused_blocks(model)
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output.numel() if isinstance(output, torch.Tensor) else 0

    for module in model.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(count)
    side = 2 * max(_feature_info(backbone).reduction())
    with torch.no_grad():
        model(torch.empty(1, 3, side, side, device="meta"))
    return total / side ** 2


@lru_cache(maxsize=4)
def _extractor(spec: BackboneSpec, device: str) -> FeatureExtractor:
    return FeatureExtractor(spec, device)


def load_extractor(backbone: str, strides, input_size: int, weights: str | None = None, pretrained: bool = True,
                   device: str = "auto", mean=None, std=None, create_kwargs: dict | None = None,
                   geometry: Geometry | None = None) -> FeatureExtractor:
    """A (process-wide cached) feature extractor; repeated calls with the same settings share the model.
    ``geometry`` (None: a squash to ``input_size``; a squash to that very size is the same) decides the network
    inputs of :meth:`~FeatureExtractor.features_of`."""
    if geometry is not None and geometry.mode == "squash" and geometry.input_hw == (input_size, input_size):
        geometry = None
    with SETUP_TIME.timing():  # the first call imports timm and builds the network; later ones hit the caches
        source = _resolved_weights(backbone, weights, pretrained, _tuple(mean), _tuple(std),
                                   _pairs(create_kwargs or {}), _offline())
        spec = BackboneSpec(backbone, tuple(int(s) for s in strides), source, int(input_size), geometry=geometry)
        return _extractor(spec, resolve_device(device))


@lru_cache(maxsize=4)
def int8_extractor(extractor: FeatureExtractor, model: bytes) -> FeatureExtractor:
    """``extractor.quantised(model)``, cached per process (detectors look their extractor up on every call)."""
    return extractor.quantised(model)


@lru_cache(maxsize=16)
def _resolved_weights(backbone, weights, pretrained, mean, std, create_pairs, offline) -> WeightsSource:
    """:func:`resolve_weights` memoised per process (detectors look their extractor up on every call); the
    offline flag is part of the key so that changing it takes effect."""
    return resolve_weights(backbone, weights, pretrained, mean, std, dict(create_pairs))


def _tuple(values):
    return tuple(values) if values is not None else None


def drop_unused_blocks(model) -> None:
    """timm's MobileNet/EfficientNet feature models run every block even when the last stages are not
    returned; drop the blocks after the deepest returned stage (ResNet-style FeatureListNets already stop)."""
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.mobilenetv3 import MobileNetV3Features

    if isinstance(model, (EfficientNetFeatures, MobileNetV3Features)) and model.feature_hooks is None:
        deepest = max((int(name.split(".")[1]) for name in model.feature_info.module_name()
                       if name.startswith("blocks.")), default=-1)
        model.blocks = model.blocks[:deepest + 1]

