"""Base config dataclass: validated in ``__post_init__``, JSON round-trip, a version field.

Each method defines a subclass and registers the function that applies it (see ``api.register``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from sparseland.errors import SparselandError

CONFIG_VERSION = 1
_CONFIG_TYPES: dict[str, type[SparsityConfig]] = {}


@dataclasses.dataclass
class SparsityConfig:
    """Base of every method config. Subclasses validate their fields in ``validate``."""

    kind: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _CONFIG_TYPES[cls.kind] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SparsityConfig:
        data = dict(data)
        kind = data.pop("kind", None)
        version = data.pop("version", CONFIG_VERSION)
        if kind not in _CONFIG_TYPES:
            raise SparselandError(f"unknown config kind {kind!r}; known: {sorted(_CONFIG_TYPES)}")
        if version > CONFIG_VERSION:
            raise SparselandError(
                f"config version {version} is newer than this sparseland ({CONFIG_VERSION}); upgrade sparseland"
            )
        return _CONFIG_TYPES[kind](**data)

    @staticmethod
    def from_json(text: str) -> SparsityConfig:
        return SparsityConfig.from_dict(json.loads(text))


def check_fraction(name: str, value: float, *, allow_one: bool = False) -> None:
    """Raise a clear error unless ``0 <= value < 1`` (or ``<= 1`` with ``allow_one``)."""
    hi_ok = value <= 1 if allow_one else value < 1
    if not (isinstance(value, (int, float)) and value >= 0 and hi_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise SparselandError(f"{name}={value!r} is outside {bound}; pass a fraction such as 0.5")
