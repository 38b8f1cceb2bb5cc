"""Parse and validate constraint profiles (``profiles/*.yaml``); defaults live in the dataclasses below."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from automl_ad.errors import ConfigError
from automl_ad.profiling.profile import OVERRIDABLE_FACTS, validate_overrides
from automl_ad.safe_yaml import load_yaml_file

#: Priority keys a user can weight, and the report score dimension each one reads.
PRIORITY_DIMENSIONS = {
    "accuracy": "accuracy",
    "speed": "resources",
    "memory": "resources",
    "interpretability": "interpretability",
    "extensibility": "self_update",
    "transferability": "transferability",
    "robustness": "data_quality",
}
LOCALIZATION_NEEDS = ("required", "preferred", "not_needed")
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Hardware:
    """Where inference (and training) will run."""

    device: str = "cpu"
    cpu_cores: int = 2
    ram_gb: float = 8.0
    gpu_memory_gb: float | None = None


def _default_priorities() -> dict[str, float]:
    return {"accuracy": 1.0, "speed": 0.5, "memory": 0.25, "interpretability": 0.25, "extensibility": 0.25,
            "transferability": 0.0, "robustness": 0.25}


@dataclass(frozen=True)
class ConstraintProfile:
    """A deployment's limits and priorities. ``data`` overrides detected dataset facts (e.g. ``kind: texture``)."""

    name: str = "default"
    description: str = "No stated limits: this machine, accuracy first."
    latency_ms: float | None = None
    throughput_fps: float | None = None
    hardware: Hardware = field(default_factory=Hardware)
    max_model_mb: float | None = None
    localization: str = "preferred"
    training_time_s: float | None = None
    priorities: dict[str, float] = field(default_factory=_default_priorities)
    data: dict = field(default_factory=dict)
    backbone_weights: dict[str, str] = field(default_factory=dict)  # backbone name -> local weights file
    source: str | None = None

    @property
    def effective_latency_ms(self) -> float | None:
        """The tighter of the latency budget and the per-image time implied by the throughput need."""
        limits = [v for v in (self.latency_ms, 1000.0 / self.throughput_fps if self.throughput_fps else None) if v]
        return min(limits) if limits else None

    def deployment_limits(self) -> dict[str, float]:
        """The stated limits a deployed model must meet: ``latency_ms`` (:attr:`effective_latency_ms`) and
        ``model_mb``; absent where the profile states none."""
        limits = {"latency_ms": self.effective_latency_ms, "model_mb": self.max_model_mb}
        return {key: float(value) for key, value in limits.items() if value is not None}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?"
                       r"\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$", re.IGNORECASE)


def parse_duration(value: str | int | float) -> float:
    """``"8h"``, ``"30m"``, ``"90s"``, ``"1h30m"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration; write e.g. 8h, 30m or 90s")
    if isinstance(value, (int, float)):
        seconds = _finite(value)
    else:
        match = _DURATION.match(str(value))
        if not match or not any(match.groups()):
            raise ConfigError(f"{value!r} is not a duration; write e.g. 8h, 30m, 90s or 1h30m")
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"duration {value!r} must be a positive, finite time such as 8h, 30m or 90s")
    return seconds


def _finite(value) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(options))}."


def _check_keys(section: str, data: dict, allowed, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}' in {section}.{_did_you_mean(str(key), allowed)}")


def _number(value, key: str, where: str, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    number = _finite(value)
    if number is None or number <= 0:
        infinite = isinstance(value, (int, float)) and not isinstance(value, bool) and number is None
        raise ConfigError(f"{where}: '{key}' must be a positive number, got {value!r}"
                          + (" (not a finite number); leave the key out for no limit" if infinite else ""))
    return number


_TOP_KEYS = {"name", "description", "latency_ms", "throughput_fps", "hardware", "max_model_mb", "localization",
             "training_time", "priorities", "data", "backbone_weights"}


def constraints_from_dict(data: dict, where: str = "constraint profile") -> ConstraintProfile:
    """Validate a mapping (as read from YAML) and build a :class:`ConstraintProfile`."""

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, latency_ms, hardware, ...), "
                          f"got {type(data).__name__}")
    _check_keys("the profile", data, _TOP_KEYS, where)
    defaults = ConstraintProfile()

    hardware_data = data.get("hardware") or {}
    if not isinstance(hardware_data, dict):
        raise ConfigError(f"{where}: 'hardware' must be a mapping (device, cpu_cores, ram_gb, gpu_memory_gb)")
    _check_keys("hardware", hardware_data, {f.name for f in dataclasses.fields(Hardware)}, where)
    device = hardware_data.get("device", "cpu")
    if device not in DEVICES:
        raise ConfigError(f"{where}: hardware.device must be one of {DEVICES}, got {device!r}")
    cores = hardware_data.get("cpu_cores", Hardware.cpu_cores)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ConfigError(f"{where}: hardware.cpu_cores must be a whole number >= 1, got {cores!r}")
    gpu_memory = _number(hardware_data.get("gpu_memory_gb"), "hardware.gpu_memory_gb", where)
    if device == "cpu" and gpu_memory:
        raise ConfigError(f"{where}: hardware.gpu_memory_gb is set but hardware.device is cpu; set device: gpu")
    hardware = Hardware(device, cores, _number(hardware_data.get("ram_gb", Hardware.ram_gb), "hardware.ram_gb", where),
                        gpu_memory)

    priorities = data.get("priorities") or {}
    if not isinstance(priorities, dict):
        raise ConfigError(f"{where}: 'priorities' must be a mapping such as {{accuracy: 1.0, speed: 2.0}}")
    _check_keys("priorities", priorities, PRIORITY_DIMENSIONS, where)
    for key, value in priorities.items():
        if _finite(value) is None or value < 0:
            raise ConfigError(f"{where}: priority '{key}' must be a number >= 0, got {value!r}")
    merged = {**defaults.priorities, **{k: float(v) for k, v in priorities.items()}}
    if not any(merged.values()):
        raise ConfigError(f"{where}: at least one priority must be above 0")

    localization = data.get("localization", defaults.localization)
    if localization not in LOCALIZATION_NEEDS:
        raise ConfigError(f"{where}: localization must be one of {LOCALIZATION_NEEDS}, got {localization!r}."
                          + _did_you_mean(str(localization), LOCALIZATION_NEEDS))
    overrides = data.get("data") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'data' must be a mapping of dataset facts to override, e.g. {{kind: texture}}")
    _check_keys("data", overrides, OVERRIDABLE_FACTS, where)
    validate_overrides(overrides, where=f"{where}: data")
    training = data.get("training_time")
    try:
        training_time_s = parse_duration(training) if training is not None else None
    except ConfigError as exc:
        raise ConfigError(f"{where}: training_time: {exc}") from exc
    return ConstraintProfile(
        name=str(data.get("name", defaults.name)),
        description=str(data.get("description", "")),
        latency_ms=_number(data.get("latency_ms"), "latency_ms", where),
        throughput_fps=_number(data.get("throughput_fps"), "throughput_fps", where),
        hardware=hardware,
        max_model_mb=_number(data.get("max_model_mb"), "max_model_mb", where),
        localization=localization,
        training_time_s=training_time_s,
        priorities=merged,
        data=dict(overrides),
        backbone_weights=_backbone_weights(data.get("backbone_weights"), where),
    )


def _backbone_weights(mapping, where: str) -> dict[str, str]:
    """``{backbone: path}`` of local weight files (relative paths are taken from the profile's folder)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: 'backbone_weights' must map backbone names to weight files, "
                          "e.g. {mobilenetv2_100: weights/mobilenetv2.safetensors}")
    from automl_ad.features.backbone import BackboneWeightsError, check_weights_file

    base = Path(where).parent if Path(where).suffix in (".yaml", ".yml") else Path.cwd()
    resolved = {}
    for name, path in mapping.items():
        file = (base / str(path)).expanduser().resolve()
        if not file.is_file():
            raise ConfigError(f"{where}: backbone_weights.{name}: {file} does not exist")
        try:  # the check fit and search make: a file they would refuse is refused here, before any work
            check_weights_file(file, str(name))
        except BackboneWeightsError as exc:
            raise ConfigError(f"{where}: backbone_weights.{name}: {exc}") from exc
        resolved[str(name)] = str(file)
    return resolved


def builtin_profiles() -> dict[str, Path]:
    """The example profiles shipped with automl-ad (``profiles/`` of the repository), by name."""
    folder = resources.files("automl_ad.profiles")
    return {p.name[:-5]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def profile_path(path: str | Path) -> Path:
    """A profile file, or the name of a built-in profile (``edge-cpu``); a clear error when neither."""
    if Path(path).is_file():
        return Path(path)
    builtin = builtin_profiles()
    if str(path) in builtin:
        return builtin[str(path)]
    raise ConfigError(f"constraint profile {path} does not exist; pass a YAML file or one of the built-in "
                      f"profiles: {', '.join(sorted(builtin))}")


def load_constraints(path: str | Path | None) -> ConstraintProfile:
    """Read a YAML constraint profile; ``None`` gives the default profile for this machine."""
    if path is None:
        return ConstraintProfile(hardware=detect_hardware())
    path = profile_path(path)
    profile = constraints_from_dict(load_yaml_file(path) or {}, where=str(path))
    return dataclasses.replace(profile, source=str(path))


def detect_hardware() -> Hardware:
    """This machine: CPU cores, RAM and (when ``nvidia-smi`` reports one) the first GPU's memory."""
    import shutil
    import subprocess

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 8.0
    gpu_memory = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split()
            gpu_memory = round(float(out[0]) / 1024, 1) if out else None
        except (subprocess.SubprocessError, ValueError, OSError):
            gpu_memory = None
    return Hardware("gpu" if gpu_memory else "cpu", cores, round(ram, 1), gpu_memory)
