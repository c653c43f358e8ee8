"""Sparsifiers for any plain training loop (torch.ao style): static masks, GMP, SET and RigL.

    sp = RigL(model, optimizer, sparsity=0.9, distribution="erk", update_every=100, total_steps=T)
    for batch in data:
        loss = model(**batch).loss; loss.backward()   # gradient hooks mask the gradients
        optimizer.step(); optimizer.zero_grad()
        sp.step()                                     # mask updates, then the mask is re-applied

The masks live in a ``MaskSet``; gradients are masked by hooks as they are computed (so momentum and
Adam moments of pruned weights stay zero) and weights are re-masked after each step (so weight decay
cannot move a zero). Regrown weights start at 0 with their optimizer state reset, as SET and RigL do.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from sparseland.api import register
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.training.configs import DSTConfig, GMPConfig, GraNetConfig, RigLConfig, SETConfig, StaticConfig
from sparseland.training.distributions import layer_densities, magnitude_masks, n_kept, random_masks, topk_mask
from sparseland.training.masking import MaskSet, ParamFilter, default_filter, reset_optimizer_state


class Sparsifier:
    """Base: holds the model, optimizer, config and step counter ``t`` (completed optimizer steps)."""

    config_cls: ClassVar[type[SparsityConfig]] = SparsityConfig

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: SparsityConfig | None = None,
        *,
        filter_fn: ParamFilter = default_filter,
        **kwargs: Any,
    ) -> None:
        if config is None:
            config = self.config_cls(**kwargs)
        elif kwargs:
            raise SparselandError(f"pass either config= or keyword fields, not both (got {sorted(kwargs)})")
        if not isinstance(config, self.config_cls):
            raise SparselandError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.model, self.optimizer, self.config = model, optimizer, config
        self.t = 0
        self.params = {n: p for n, p in model.named_parameters() if filter_fn(n, p)}
        if not self.params:
            raise SparselandError("filter_fn selected no parameters to sparsify; check the filter against the model")

    def step(self) -> None:  # overridden
        self.t += 1

    def remove(self) -> None:
        """Detach from the model (hooks, parametrizations); weights keep their current values."""


class MaskedSparsifier(Sparsifier):
    """Unstructured masks kept exactly through the optimizer; subclasses decide ``initial_masks``/``update``."""

    needs_dense_grad: ClassVar[bool] = False

    def __init__(self, model, optimizer=None, config=None, *, filter_fn: ParamFilter = default_filter, **kwargs):
        super().__init__(model, optimizer, config, filter_fn=filter_fn, **kwargs)
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.masks = MaskSet(model, self.initial_masks())
        self.dense_grads: dict[str, torch.Tensor] = {}
        self.last_update: dict[str, tuple[int, int]] = {}  # name -> (dropped, grown) at the last update
        for name, mask in self.masks.masks.items():
            self._reset_state(name, ~mask)
        self.masks.apply_()
        self._hooks = [p.register_hook(self._grad_hook(n)) for n, p in self.params.items()]
        self.update(0)  # methods that act at step 0 (GMP with start_step=0)
        self.masks.apply_()

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return {n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()}

    def is_update_step(self, t: int) -> bool:
        return False

    def update(self, t: int) -> None:
        """Change masks after optimizer step ``t`` (``t = 0``: at construction)."""

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.needs_dense_grad and self.is_update_step(self.t + 1):  # RigL: keep the dense gradient
                prev = self.dense_grads.get(name)
                self.dense_grads[name] = grad.detach().clone() if prev is None else prev + grad.detach()
            return grad * self.masks.masks[name]

        return hook

    def _reset_state(self, name: str, where: torch.Tensor) -> None:
        if self.optimizer is not None and bool(where.any()):
            reset_optimizer_state(self.optimizer, self.params[name], where)

    @torch.no_grad()
    def set_mask(self, name: str, new: torch.Tensor, grown: torch.Tensor | None = None) -> None:
        """Install ``new`` in place (hooks see it); zero pruned and ``grown`` weights and their optimizer state."""
        old = self.masks.masks[name]
        fresh = (old & ~new) if grown is None else (old & ~new) | grown
        old.copy_(new)
        self.params[name][~new] = 0
        if grown is not None:
            self.params[name][grown] = 0  # regrown weights start at zero (RigL, SET)
        self._reset_state(name, fresh)

    def mask_grads_(self) -> None:
        """Mask ``.grad`` explicitly (not needed with the hooks; for loops that write gradients directly)."""
        self.masks.mask_grads_()

    def step(self) -> None:
        """Call once after each ``optimizer.step()``."""
        self.t += 1
        if self.is_update_step(self.t):
            self.update(self.t)
        self.dense_grads.clear()
        self.masks.apply_()

    def density(self) -> float:
        return self.masks.density()

    def check(self) -> None:
        self.masks.check()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class StaticSparsifier(MaskedSparsifier):
    """A fixed mask for the whole run: random with uniform / ERK densities ("The Unreasonable Effectiveness
    of Random Pruning", Liu et al. 2022) or one-shot magnitude at those densities."""

    config_cls = StaticConfig

    def initial_masks(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        densities = layer_densities(self.shapes, cfg.sparsity, cfg.distribution)
        if cfg.init == "random":
            return random_masks(self.shapes, densities, cfg.seed)
        return magnitude_masks({n: p for n, p in self.params.items()}, densities)


def gmp_sparsity(t: int, cfg: GMPConfig) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 on [t0, t0 + n dt]; 0 before t0."""
    if t < cfg.start_step:
        return 0.0
    progress = min(1.0, (t - cfg.start_step) / (cfg.n_prunes * cfg.prune_every))
    return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** 3


class GMP(MaskedSparsifier):
    """Gradual magnitude pruning ("To prune, or not to prune", Zhu & Gupta 2017): every dt steps from t0 to
    t0 + n dt, prune the smallest |W| of each layer up to the cubic schedule's sparsity; pruned stay pruned."""

    config_cls = GMPConfig

    def is_update_step(self, t: int) -> bool:
        cfg = self.config
        return cfg.start_step <= t <= cfg.end_step and (t - cfg.start_step) % cfg.prune_every == 0

    def update(self, t: int) -> None:
        if not self.is_update_step(t):
            return
        densities = layer_densities(self.shapes, gmp_sparsity(t, self.config), self.config.distribution)
        for name, p in self.params.items():
            mask = self.masks.masks[name]
            k = min(n_kept(p.numel(), densities[name]), int(mask.sum()))
            score = torch.where(mask, p.detach().abs().float(), torch.full_like(p, -1.0, dtype=torch.float32))
            self.set_mask(name, topk_mask(score, k))


def cosine_drop_fraction(t: int, alpha: float, t_end: float) -> float:
    """RigL's update schedule: f(t) = alpha / 2 * (1 + cos(pi t / T_end))."""
    return alpha / 2 * (1 + math.cos(math.pi * min(t, t_end) / t_end))


class DynamicSparsifier(MaskedSparsifier):
    """Dynamic sparse training: every ``update_every`` steps until ``end_fraction * total_steps``, drop the
    ``f(t) * n_active`` smallest |W| of each layer and regrow exactly as many among the non-kept entries."""

    config_cls = DSTConfig

    def __init__(self, model, optimizer=None, config=None, *, filter_fn: ParamFilter = default_filter, **kwargs):
        if optimizer is None:
            raise SparselandError(
                f"{type(self).__name__} resets the optimizer state of regrown weights; pass the optimizer"
            )
        super().__init__(model, optimizer, config, filter_fn=filter_fn, **kwargs)

    def initial_masks(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # regrowth draws (SET)
        return random_masks(self.shapes, layer_densities(self.shapes, cfg.sparsity, cfg.distribution), cfg.seed)

    @property
    def t_end(self) -> float:
        return self.config.end_fraction * self.config.total_steps

    def is_update_step(self, t: int) -> bool:
        return t > 0 and t % self.config.update_every == 0 and t < self.t_end

    def grow_scores(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def update(self, t: int) -> None:
        if not self.is_update_step(t):
            return
        frac = cosine_drop_fraction(t, self.config.drop_fraction, self.t_end)
        for name, p in self.params.items():
            mask = self.masks.masks[name]
            n_active = int(mask.sum())
            k = int(frac * n_active)
            if k == 0:
                self.last_update[name] = (0, 0)
                continue
            # Step 1: drop the k smallest |W| among the kept.
            neg_inf = torch.full(mask.shape, -math.inf)
            kept = topk_mask(torch.where(mask, p.detach().abs().float(), neg_inf), n_active - k)
            # Step 2: regrow k among everything not kept now (just-dropped included), by the method's score.
            grown = topk_mask(torch.where(kept, neg_inf, self.grow_scores(name)), k)
            self.last_update[name] = (int((mask & ~kept).sum()), int(grown.sum()))
            self.set_mask(name, kept | grown, grown=grown)


class SET(DynamicSparsifier):
    """SET (Mocanu et al. 2018, "Scale-free ... Sparse Evolutionary Training"): drop the smallest |W|, regrow
    as many at uniformly random non-kept positions (zero-initialised); fraction cosine-decayed as in RigL."""

    config_cls = SETConfig

    def grow_scores(self, name: str) -> torch.Tensor:
        return torch.rand(self.shapes[name], generator=self.generator)


class RigL(DynamicSparsifier):
    """RigL (Evci et al. 2020, "Rigging the Lottery"): drop the smallest |W|, regrow as many where the dense
    |gradient| of the update step is largest; regrown weights start at 0 with fresh optimizer state."""

    config_cls = RigLConfig
    needs_dense_grad = True

    def grow_scores(self, name: str) -> torch.Tensor:
        grad = self.dense_grads.get(name)
        if grad is None:
            raise SparselandError(
                f"RigL found no dense gradient for {name!r} at step {self.t}; call loss.backward() before "
                "optimizer.step() and sp.step() once per step (the gradient hooks record it)"
            )
        return grad.abs().float()


class GraNet(GMP):
    """GraNet ("Sparse Training via Boosting Pruning Plasticity with Neuroregeneration", Liu et al. 2021):
    gradual magnitude pruning on the cubic schedule, and at each pruning step zero-cost neuroregeneration:
    drop the ``f(t) * n_active`` smallest |W| (cosine-decayed f) and regrow as many where the dense
    |gradient| is largest, zero-initialised with fresh optimizer state. Continues the drop/regrow every
    ``prune_every`` steps after the schedule ends, until ``end_fraction * total_steps``."""

    config_cls = GraNetConfig
    needs_dense_grad = True

    def is_update_step(self, t: int) -> bool:
        cfg = self.config
        return t >= cfg.start_step and (t - cfg.start_step) % cfg.prune_every == 0 and t < self.t_end

    @property
    def t_end(self) -> float:
        return self.config.end_fraction * self.config.total_steps

    def update(self, t: int) -> None:
        if not self.is_update_step(t):
            return
        if t <= self.config.end_step:
            super().update(t)  # Step 1: prune to the cubic schedule's sparsity
        frac = cosine_drop_fraction(t, self.config.drop_fraction, self.t_end)
        for name, p in self.params.items():  # Step 2: neuroregeneration at constant density
            grad = self.dense_grads.get(name)
            mask = self.masks.masks[name]
            n_active = int(mask.sum())
            k = int(frac * n_active)
            if grad is None or k == 0:  # no gradient at construction (t = 0)
                self.last_update[name] = (0, 0)
                continue
            neg_inf = torch.full(mask.shape, -math.inf)
            kept = topk_mask(torch.where(mask, p.detach().abs().float(), neg_inf), n_active - k)
            grown = topk_mask(torch.where(kept, neg_inf, grad.abs().float()), k)
            self.last_update[name] = (int((mask & ~kept).sum()), int(grown.sum()))
            self.set_mask(name, kept | grown, grown=grown)


def linear_filter(model: torch.nn.Module, filter_fn) -> ParamFilter:
    """Turn ``sparsify_``'s ``filter_fn(module, name)`` over modules into a filter over Linear weights."""
    names = {
        f"{mn}.weight" for mn, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and filter_fn(mod, mn)
    }
    return lambda name, param: name in names


@register(StaticConfig)
def apply_static(model: torch.nn.Module, config: StaticConfig, calibration=None, filter_fn=None) -> MaskSet:  # noqa: ARG001
    """``sparsify_(model, StaticConfig(...))``: zero the masked-out weights once; returns the ``MaskSet``
    (call ``hook_grads()``/``apply_()`` on it, or use ``StaticSparsifier``, to keep it through training)."""
    pf = default_filter if filter_fn is None else linear_filter(model, filter_fn)
    sp = StaticSparsifier(model, None, config, filter_fn=pf)
    sp.remove()
    return sp.masks
