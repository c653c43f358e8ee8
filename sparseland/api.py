"""``sparsify_``: the one entry point that makes a model sparse in place.

    sparsify_(model, WandaConfig(sparsity=0.5, pattern="2:4"), calibration=tokens)

A registry maps each config type to the function that applies it; methods register themselves
with ``@register(ConfigType)`` when their module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError

FilterFn = Callable[[torch.nn.Module, str], bool]
_REGISTRY: dict[type[SparsityConfig], Callable[..., Any]] = {}


def register(config_type: type[SparsityConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(model, config, calibration=None, filter_fn=None)`` applies ``config_type``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[config_type] = fn
        return fn

    return deco


def sparsify_(
    model: torch.nn.Module,
    config: SparsityConfig,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
) -> Any:
    """Apply ``config`` to ``model`` in place; returns the method's report (if any).

    ``calibration`` is a ``(N, T)`` LongTensor of token windows for methods that need data;
    ``filter_fn(module, name)`` selects which modules are touched (default: the method's own choice).
    """
    for cls in type(config).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](model, config, calibration=calibration, filter_fn=filter_fn)
    known = sorted(c.__name__ for c in _REGISTRY)
    raise SparselandError(f"no method is registered for {type(config).__name__}; known configs: {known}")
