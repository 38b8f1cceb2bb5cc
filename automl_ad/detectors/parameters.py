"""Declarative constraints on detector constructor parameters (scikit-learn's ``_parameter_constraints`` is the model).

Each family maps every constructor parameter to a list of constraints; a value is valid when it meets one of them.
A constraint is ``None`` (the value None), a type (``str``, ``bool``, ``os.PathLike``: an instance of it) or one of
the classes below. :meth:`Detector.fit <automl_ad.detectors.base.Detector.fit>` checks them with
:func:`check_parameters`; a test checks every search space's bounds and choices with :func:`parameter_problem`.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import numpy as np

from automl_ad.errors import InvalidParameterError


class Constraint:
    """A set of allowed values: ``allows(value)``; ``str()`` completes "must be ..."."""

    def allows(self, value) -> bool:
        raise NotImplementedError


def _is_integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


class Interval(Constraint):
    """Integers (``kind=Integral``) or finite real numbers (``kind=Real``) between ``low`` and ``high`` (None: no
    bound); ``closed`` says which bounds belong to it: "left", "right", "both" or "neither"."""

    def __init__(self, kind: type, low: float | None, high: float | None, *, closed: str):
        if kind not in (Integral, Real) or closed not in ("left", "right", "both", "neither"):
            raise TypeError(f"Interval(kind={kind!r}, closed={closed!r}): kind is Integral or Real, closed is "
                            "left, right, both or neither")
        self.kind, self.low, self.high = kind, low, high
        self.left_closed, self.right_closed = closed in ("left", "both"), closed in ("right", "both")

    def allows(self, value) -> bool:
        if not (_is_integer(value) if self.kind is Integral else _is_real(value)):
            return False
        above = self.low is None or (value >= self.low if self.left_closed else value > self.low)
        below = self.high is None or (value <= self.high if self.right_closed else value < self.high)
        return bool(above and below)

    def __str__(self) -> str:
        if self.high is None:
            bounds = f"{'>=' if self.left_closed else '>'} {self.low:g}" if self.low is not None else ""
        elif self.low is None:
            bounds = f"{'<=' if self.right_closed else '<'} {self.high:g}"
        else:
            bounds = (f"in {'[' if self.left_closed else '('}{self.low:g}, {self.high:g}"
                      f"{']' if self.right_closed else ')'}")
        return f"an integer {bounds}".rstrip() if self.kind is Integral else bounds or "a finite number"


class Options(Constraint):
    """One of a fixed set of values (of the same type: ``True`` is not ``1``)."""

    def __init__(self, *values):
        self.values = values

    def allows(self, value) -> bool:
        return any(type(value) is type(option) and value == option for option in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.values)


class PowerOfTwo(Constraint):
    """A power of two >= ``low`` (strided architectures halve the image down to a few pixels)."""

    def __init__(self, low: int):
        self.low = low

    def allows(self, value) -> bool:
        return _is_integer(value) and value >= self.low and not int(value) & (int(value) - 1)

    def __str__(self) -> str:
        return f"a power of two >= {self.low} (e.g. {self.low}, {2 * self.low}, {4 * self.low})"


class MultipleOf(Constraint):
    """A positive multiple of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def allows(self, value) -> bool:
        return _is_integer(value) and value > 0 and value % self.step == 0

    def __str__(self) -> str:
        return f"a positive multiple of {self.step}"


class TupleOf(Constraint):
    """A tuple (or list) of at least ``min_length`` items each meeting ``item``; ``pair``: exactly (low, high) with
    low <= high."""

    def __init__(self, item: Constraint, *, min_length: int = 1, pair: bool = False):
        self.item, self.min_length, self.pair = item, min_length, pair

    def allows(self, value) -> bool:
        if not isinstance(value, (tuple, list)) or not all(self.item.allows(v) for v in value):
            return False
        return len(value) == 2 and value[0] <= value[1] if self.pair else len(value) >= self.min_length

    def __str__(self) -> str:
        if self.pair:
            return f"a pair (low, high) with low <= high, each {self.item}"
        count = {0: "zero or more", 1: "one or more"}.get(self.min_length, f"at least {self.min_length}")
        return f"a tuple of {count} values, each {self.item}"


class _InstanceOf(Constraint):
    _NAMES = {str: "a string", bool: "True or False", os.PathLike: "a path", type(None): "None"}

    def __init__(self, kind: type):
        self.kind = kind

    def allows(self, value) -> bool:
        if self.kind is bool:
            return isinstance(value, (bool, np.bool_))
        return isinstance(value, self.kind)

    def __str__(self) -> str:
        return self._NAMES.get(self.kind, f"an instance of {self.kind.__name__}")


def _constraint(spec) -> Constraint:
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return _InstanceOf(type(None))
    if isinstance(spec, type):
        return _InstanceOf(spec)
    raise TypeError(f"{spec!r} is not a parameter constraint (None, a type, or a Constraint)")


def describe(constraints: list) -> str:
    """What a parameter with ``constraints`` must be, e.g. "None or an integer >= 1"."""
    return " or ".join(str(_constraint(c)) for c in constraints)


def parameter_problem(family: str, declared: dict, name: str, value) -> str | None:
    """Why ``value`` is not allowed for parameter ``name`` of ``family`` (None when it is)."""
    if name not in declared:
        raise TypeError(f"{family} declares no constraints for its parameter '{name}' (_parameter_constraints)")
    constraints = declared[name]
    if any(_constraint(c).allows(value) for c in constraints):
        return None
    return f"{family}: {name} must be {describe(constraints)}, got {value!r}"


def check_parameters(family: str, declared: dict, params: dict) -> None:
    """Raise :class:`InvalidParameterError` for the first parameter in ``params`` its constraints do not allow."""
    for name, value in params.items():
        problem = parameter_problem(family, declared, name, value)
        if problem:
            raise InvalidParameterError(problem)


# --- constraints many families share --------------------------------------------------------------------------
POSITIVE_INT = Interval(Integral, 1, None, closed="left")
NON_NEGATIVE_INT = Interval(Integral, 0, None, closed="left")
POSITIVE = Interval(Real, 0, None, closed="neither")
NON_NEGATIVE = Interval(Real, 0, None, closed="left")
#: Decay factors (SGD momentum, Adam's beta1, an EMA's decay).
DECAY = Interval(Real, 0, 1, closed="left")
