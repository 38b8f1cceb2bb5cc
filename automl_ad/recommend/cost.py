"""Planning estimates of inference latency per route, and the backbone that fits a budget at the proposed input
geometry (backbone time grows with the pixels the network sees: more tiles or a larger view cost proportionally)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from automl_ad.constraints import ConstraintProfile


@dataclass(frozen=True)
class CostEstimate:
    """Estimated latency of one route under the constraints, with the backbone and input side it assumes."""

    latency_ms: float
    budget_ms: float | None  # the stated budget (None when the profile states none)
    backbone: str | None
    resolution: int  # network input side: the geometry's (tile) side for backbone routes, the working side otherwise
    basis: str

    @property
    def latency_ratio(self) -> float | None:
        return self.latency_ms / self.budget_ms if self.budget_ms else None


@lru_cache(maxsize=1)
def cost_model() -> dict:
    return yaml.safe_load(resources.files("automl_ad.recommend").joinpath("cost_model.yaml").read_text())


def backbone_ms(gmac_224: float, resolution: int, constraints: ConstraintProfile) -> float:
    """Estimated backbone time for one square image at ``resolution`` on the profile's hardware."""
    return pixels_ms(gmac_224, resolution * resolution, constraints)


def pixels_ms(gmac_224: float, pixels: int, constraints: ConstraintProfile) -> float:
    """Estimated backbone time for ``pixels`` network input pixels per image (all tiles of it, batched in one
    call) on the profile's hardware: convolutional work is proportional to the pixels."""
    model = cost_model()["devices"]
    gmac = gmac_224 * pixels / 224 ** 2
    if constraints.hardware.device == "gpu":
        return model["gpu"]["overhead_ms"] + gmac * model["gpu"]["ms_per_gmac"]
    cpu = model["cpu"]
    speedup = (constraints.hardware.cpu_cores / 2) ** cpu["core_scaling_exponent"]
    return gmac * cpu["ms_per_gmac_2_cores"] / speedup


def latency_target_ms(constraints: ConstraintProfile) -> tuple[float, bool]:
    """The per-image time to aim at: the stated budget, else the one assumed for the device; and whether stated."""
    budget = constraints.effective_latency_ms
    if budget is not None:
        return budget, True
    return cost_model()["assumed_latency_ms"][constraints.hardware.device], False


def heaviest_head_factor() -> float:
    """The largest time factor a route's head adds to its backbone (geometry proposals leave room for it)."""
    return max(r["head_factor"] for r in cost_model()["routes"].values() if r["backbone"])


def estimate_route(route: str, constraints: ConstraintProfile, working_side: int, network_pixels: int,
                   input_side: int, backbones: list[str] | None = None) -> CostEstimate:
    """Pick the heaviest of ``backbones`` (default: every backbone of the cost model) whose estimate at
    ``network_pixels`` per image (the proposed geometry) fits the budget, else the lightest; estimate latency.
    Routes without a backbone work on images of ``working_side`` (taken within 64..512)."""
    model = cost_model()
    spec = model["routes"][route]
    device = constraints.hardware.device
    budget = constraints.effective_latency_ms
    target, _ = latency_target_ms(constraints)
    fixed = 0.0
    if "cpu_ms_256" in spec:
        side = min(max(working_side, 64), 512) if not spec["backbone"] else 256
        fixed = spec["cpu_ms_256"] * (side / 256) ** 2
        if device == "cpu":
            fixed /= (constraints.hardware.cpu_cores / 2) ** model["devices"]["cpu"]["core_scaling_exponent"]
        else:
            fixed /= 20.0  # convolutional work moves to the GPU
    if not spec["backbone"]:
        side = min(max(working_side, 64), 512)
        return CostEstimate(round(fixed, 1), budget, None, side, spec["basis"])
    options = [(b["name"], pixels_ms(b["gmac_224"], network_pixels, constraints) * spec["head_factor"] + fixed)
               for b in model["backbones"] if backbones is None or b["name"] in backbones]
    if not options:
        raise ValueError(f"none of the backbones {backbones} is in the cost model")
    if budget is None:
        target += fixed  # without a stated budget, the route's own fixed cost is accepted
    fitting = [o for o in options if o[1] <= target]
    name, latency = max(fitting, key=lambda o: o[1]) if fitting else min(options, key=lambda o: o[1])
    return CostEstimate(round(latency, 1), budget, name, input_side, spec["basis"])
