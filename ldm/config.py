"""The config.json side of every frozen config dataclass, written once."""
from __future__ import annotations

import math
from dataclasses import asdict, fields
from numbers import Real
from typing import Any

import numpy as np


class JsonConfig:
    """Mixin for frozen dataclasses: `to_dict()` (tuples as lists, JSON-ready) and `from_dict()` (unknown fields
    are an error naming them; missing ones take their defaults)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)


def is_int(value) -> bool:
    """An integer (Python or NumPy), and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite real number (int, float or NumPy scalar), and not a bool; NaN and infinities are not."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def check_number(name: str, value, low: float, high: float = float("inf"), low_open: bool = False,
                 integer: bool = False) -> None:
    """ValueError naming `name` unless value is an int (or, integer=False, a finite number) in [low, high]
    ((low, high] with low_open); bools are refused, as are NaN and infinities."""
    ok = is_int(value) if integer else is_number(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} in {lo}{low}, {high}]; got {value!r}")
