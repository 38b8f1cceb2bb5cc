"""Constraint profiles: what the deployment allows (latency, hardware, model size, localisation) and wants."""

from automl_ad.constraints.profile import (
    PRIORITY_DIMENSIONS,
    ConstraintProfile,
    Hardware,
    load_constraints,
    parse_duration,
)

__all__ = ["PRIORITY_DIMENSIONS", "ConstraintProfile", "Hardware", "load_constraints", "parse_duration"]
