"""One name -> config registry, shared by Python, the CLI and the frontier.

    make_config("wanda", sparsity=0.5, pattern="2:4")   # WandaConfig(sparsity=0.5, pattern="2:4")
    make_config("teal", sparsity=0.4)                   # TEALConfig(sparsity=0.4)
    make_config("quest", sparsity=0.75)                 # QuestConfig(keep=0.25)
    make_config("int4")                                  # QuantConfig(scheme="int4-g32")

Every name builds a ``SparsityConfig`` that ``sparsify_`` applies. ``sparsity`` means the fraction of
the method's own unit that is skipped: weights pruned, activations zeroed, attention pairs or cached
keys skipped; quantization takes none. Extra keyword ``options`` are config fields (a wrong one is a
clear error naming the config's fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError

FAMILIES = ("weights", "activations", "attention", "quant")


@dataclass(frozen=True)
class Entry:
    """``build(sparsity, options)`` makes the config; ``takes_sparsity`` is False for quantization."""

    name: str
    family: str
    build: Callable[[float | None, dict[str, Any]], SparsityConfig]
    takes_sparsity: bool = True


def _fields_check(cls: type, options: dict[str, Any], name: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise SparselandError(f"{name}: unknown option(s) {unknown}; {cls.__name__} has fields {sorted(fields)}")


def _weights(config_name: str, **defaults: Any) -> Callable[[float | None, dict[str, Any]], SparsityConfig]:
    def build(sparsity: float | None, options: dict[str, Any]) -> SparsityConfig:
        import sparseland.weights as weights

        cls = getattr(weights, config_name)
        opts = {**defaults, **options}
        _fields_check(cls, opts, config_name)
        return cls(sparsity=0.5 if sparsity is None else sparsity, **opts)

    return build


def _activations(config_name: str, **defaults: Any) -> Callable[[float | None, dict[str, Any]], SparsityConfig]:
    def build(sparsity: float | None, options: dict[str, Any]) -> SparsityConfig:
        import sparseland.activations as activations

        cls = getattr(activations, config_name)
        opts = {**defaults, **options}
        _fields_check(cls, opts, config_name)
        return cls(sparsity=0.5 if sparsity is None else sparsity, **opts)

    return build


def _attention(method: str) -> Callable[[float | None, dict[str, Any]], SparsityConfig]:
    def build(sparsity: float | None, options: dict[str, Any]) -> SparsityConfig:
        from sparseland.attention import CONFIGS
        from sparseland.attention import make_config as attention_config

        _fields_check(CONFIGS[method], options, CONFIGS[method].__name__)
        return attention_config(method, 0.5 if sparsity is None else sparsity, **options)

    return build


def _quant(scheme: str, method: str) -> Callable[[float | None, dict[str, Any]], SparsityConfig]:
    def build(sparsity: float | None, options: dict[str, Any]) -> SparsityConfig:
        from sparseland.quant import QuantConfig

        if sparsity:
            raise SparselandError(
                f"quantization ({scheme}, {method}) takes no sparsity (got {sparsity}); combine it with a "
                "pruning method instead, e.g. make_config('sparsegpt', 0.5, quant='int4-g64')"
            )
        opts = {"scheme": scheme, "method": method, **options}
        _fields_check(QuantConfig, opts, "QuantConfig")
        return QuantConfig(**opts)

    return build


def _entries() -> dict[str, Entry]:
    from sparseland.attention import METHODS as ATTENTION_METHODS

    table: list[Entry] = [
        Entry("random", "weights", _weights("RandomConfig")),
        Entry("magnitude", "weights", _weights("MagnitudeConfig")),
        Entry("wanda", "weights", _weights("WandaConfig")),
        Entry("sparsegpt", "weights", _weights("SparseGPTConfig")),
        Entry("owl", "weights", _weights("WandaConfig", allocation="owl")),  # OWL's allocation over Wanda
        Entry("dsnot", "weights", _weights("DSnoTConfig", init="wanda")),  # DSnoT refining Wanda
        Entry("teal", "activations", _activations("TEALConfig")),
        Entry("teal-greedy", "activations", _activations("TEALConfig", greedy=True)),
        Entry("cats", "activations", _activations("CATSConfig")),
        Entry("chess", "activations", _activations("CHESSConfig")),
        Entry("wina", "activations", _activations("WINAConfig")),
        Entry("wina-topk", "activations", _activations("WINAConfig", mode="topk")),
        Entry("rsparse", "activations", _activations("RSparseConfig", rank=16, match_compute=True)),
        *(Entry(m, "attention", _attention(m)) for m in ATTENTION_METHODS),
        Entry("int4", "quant", _quant("int4-g32", "rtn"), takes_sparsity=False),
        Entry("int4-g64", "quant", _quant("int4-g64", "rtn"), takes_sparsity=False),
        Entry("int4-sym", "quant", _quant("int4-g32-sym", "rtn"), takes_sparsity=False),
        Entry("int8", "quant", _quant("int8", "rtn"), takes_sparsity=False),
        Entry("gptq4-g64", "quant", _quant("int4-g64", "gptq"), takes_sparsity=False),
    ]
    return {e.name: e for e in table}


_CACHE: dict[str, Entry] = {}


def entries() -> dict[str, Entry]:
    if not _CACHE:
        _CACHE.update(_entries())
    return _CACHE


def names(family: str | None = None) -> tuple[str, ...]:
    """Registered method names, optionally of one family (``weights``, ``activations``, ...)."""
    if family is not None and family not in FAMILIES:
        raise SparselandError(f"family {family!r} is not one of {FAMILIES}")
    return tuple(n for n, e in entries().items() if family is None or e.family == family)


def get_entry(name: str) -> Entry:
    table = entries()
    if name not in table:
        raise SparselandError(f"unknown method {name!r}; choose from {', '.join(table)}")
    return table[name]


def make_config(name: str, sparsity: float | None = None, **options: Any) -> SparsityConfig:
    """The config of method ``name`` at ``sparsity`` (a fraction; default 0.5, none for quantization),
    with ``options`` overriding the config's fields."""
    return get_entry(name).build(sparsity, options)
