"""Planning estimates of inference latency per route, and the backbone/resolution that fits a budget."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from automl_ad.constraints import ConstraintProfile


@dataclass(frozen=True)
class CostEstimate:
    """Estimated latency of one route under the constraints, with the backbone and resolution it assumes."""

    latency_ms: float
    budget_ms: float | None  # the stated budget (None when the profile states none)
    backbone: str | None
    resolution: int
    basis: str

    @property
    def latency_ratio(self) -> float | None:
        return self.latency_ms / self.budget_ms if self.budget_ms else None


@lru_cache(maxsize=1)
def cost_model() -> dict:
    return yaml.safe_load(resources.files("automl_ad.recommend").joinpath("cost_model.yaml").read_text())


def backbone_ms(gmac_224: float, resolution: int, constraints: ConstraintProfile) -> float:
    """Estimated backbone time for one image at ``resolution`` on the profile's hardware."""
    model = cost_model()["devices"]
    gmac = gmac_224 * (resolution / 224) ** 2
    if constraints.hardware.device == "gpu":
        return model["gpu"]["overhead_ms"] + gmac * model["gpu"]["ms_per_gmac"]
    cpu = model["cpu"]
    speedup = (constraints.hardware.cpu_cores / 2) ** cpu["core_scaling_exponent"]
    return gmac * cpu["ms_per_gmac_2_cores"] / speedup


def estimate_route(route: str, constraints: ConstraintProfile, image_side: int) -> CostEstimate:
    """Pick the heaviest backbone (and the larger resolution) whose estimate fits the budget; estimate latency."""
    model = cost_model()
    spec = model["routes"][route]
    device = constraints.hardware.device
    budget = constraints.effective_latency_ms
    target = budget or model["assumed_latency_ms"][device]
    fixed = 0.0
    if "cpu_ms_256" in spec:
        side = min(max(image_side, 64), 512) if not spec["backbone"] else 256
        fixed = spec["cpu_ms_256"] * (side / 256) ** 2
        if device == "cpu":
            fixed /= (constraints.hardware.cpu_cores / 2) ** model["devices"]["cpu"]["core_scaling_exponent"]
        else:
            fixed /= 20.0  # convolutional work moves to the GPU
    if not spec["backbone"]:
        side = min(max(image_side, 64), 512)
        return CostEstimate(round(fixed, 1), budget, None, side, spec["basis"])
    options = [(b["name"], r, backbone_ms(b["gmac_224"], r, constraints) * spec["head_factor"] + fixed)
               for b in model["backbones"] for r in model["resolutions"]]
    if budget is None:
        target += fixed  # without a stated budget, the route's own fixed cost is accepted
    fitting = [o for o in options if o[2] <= target]
    name, resolution, latency = max(fitting, key=lambda o: (o[2], o[1])) if fitting else min(options, key=lambda o: o[2])
    return CostEstimate(round(latency, 1), budget, name, resolution, spec["basis"])
