"""Build a sparsifier from its config, and drive one from transformers' ``Trainer``.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SparsityCallback(RigLConfig(total_steps=T))])

The callback builds the sparsifier when training begins (the optimizer exists by then), the gradient
hooks mask gradients during backward, and ``on_step_end`` (after the optimizer step) calls ``step()``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from sparseland.api import register
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.training.configs import (
    GMPConfig,
    GraNetConfig,
    ProgressiveGradientFlowConfig,
    RigLConfig,
    SETConfig,
    SRSTEConfig,
    StaticConfig,
)
from sparseland.training.masking import ParamFilter, default_filter
from sparseland.training.nm import SRSTE, ProgressiveGradientFlow
from sparseland.training.sparsifiers import GMP, SET, GraNet, RigL, Sparsifier, StaticSparsifier

SPARSIFIERS: dict[type[SparsityConfig], type[Sparsifier]] = {
    StaticConfig: StaticSparsifier,
    GMPConfig: GMP,
    GraNetConfig: GraNet,
    SETConfig: SET,
    RigLConfig: RigL,
    SRSTEConfig: SRSTE,
    ProgressiveGradientFlowConfig: ProgressiveGradientFlow,
}


def make_sparsifier(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: SparsityConfig,
    filter_fn: ParamFilter = default_filter,
    **kwargs: Any,
) -> Sparsifier:
    """The sparsifier for ``config``'s method, attached to ``model`` and ``optimizer``."""
    cls = SPARSIFIERS.get(type(config))
    if cls is None:
        known = sorted(c.__name__ for c in SPARSIFIERS)
        raise SparselandError(f"no sparse trainer for {type(config).__name__}; known configs: {known}")
    return cls(model, optimizer, config, filter_fn=filter_fn, **kwargs)


def _unwrap(optimizer: Any) -> Any:
    """accelerate wraps the optimizer; the per-parameter state lives on the inner one."""
    return getattr(optimizer, "optimizer", optimizer)


class SparsityCallback(TrainerCallback):
    """``Trainer`` callback: builds the sparsifier at ``on_train_begin``, calls ``step()`` at ``on_step_end``,
    and finalizes N:M trainers at ``on_train_end``."""

    def __init__(self, config: SparsityConfig, filter_fn: ParamFilter = default_filter, **kwargs: Any) -> None:
        self.config, self.filter_fn, self.kwargs = config, filter_fn, kwargs
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ARG002
        if model is None:
            raise SparselandError("SparsityCallback got no model from the Trainer")
        self.sparsifier = make_sparsifier(model, _unwrap(optimizer), self.config, self.filter_fn, **self.kwargs)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.sparsifier is not None:
            self.sparsifier.step()

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ARG002
        finalize = getattr(self.sparsifier, "finalize", None)
        if finalize is not None:
            finalize()


def _apply_training(model: torch.nn.Module, config: SparsityConfig, calibration=None, filter_fn=None) -> Sparsifier:  # noqa: ARG001
    """``sparsify_(model, GMPConfig(...))`` and the other sparse-training configs: the sparsifier
    controller, attached to ``model``; set ``sparsifier.optimizer`` to the optimizer you step and call
    ``sparsifier.step()`` after each optimizer step (or use ``SparsityCallback`` with a ``Trainer``)."""
    from sparseland.training.sparsifiers import linear_filter

    pf = default_filter if filter_fn is None else linear_filter(model, filter_fn)
    return make_sparsifier(model, None, config, pf)


for _cfg in SPARSIFIERS:
    if _cfg is not StaticConfig:  # StaticConfig zeroes once and returns the MaskSet (sparsifiers.py)
        register(_cfg)(_apply_training)
