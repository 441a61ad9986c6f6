"""The config.json side of every frozen config dataclass, written once."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any


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
