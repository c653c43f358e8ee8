"""N:M sparse training from scratch: SR-STE and progressive gradient flow.

Both keep dense weights and compute, at every forward, the N:M mask of the current dense weights by
magnitude; the forward sees the masked (or softly masked) weight through a parametrization of each
selected ``weight``, so the training loop and the optimizer are untouched (an optimizer built before the
sparsifier keeps working: the parametrized tensor is the same ``Parameter``). ``finalize()`` (automatic at
``total_steps``) writes the N:M weights back as plain parameters and keeps that mask from then on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.utils import parametrize

from sparseland.errors import SparselandError
from sparseland.training.configs import ProgressiveGradientFlowConfig, SRSTEConfig
from sparseland.training.masking import MaskSet, ParamFilter, default_filter
from sparseland.training.sparsifiers import Sparsifier
from sparseland.weights.masks import check_nm_shape, nm_mask


class _SoftMask(torch.autograd.Function):
    """Forward ``W * (m + beta (1 - m))``; backward by ``mode``: "srste" g + lambda (1 - m) W (Zhou et al.),
    "ste" g unchanged (straight through), "scaled" g * (m + beta (1 - m)) (the exact chain rule)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, mask: torch.Tensor, beta: float, mode: str, decay: float) -> torch.Tensor:
        scale = mask.to(w.dtype) if beta == 0 else torch.where(mask, 1.0, beta).to(w.dtype)  # (out, in)
        ctx.save_for_backward(w, mask, scale)
        ctx.mode, ctx.decay = mode, decay
        return w * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        w, mask, scale = ctx.saved_tensors
        if ctx.mode == "srste":
            grad = grad + ctx.decay * (~mask).to(w.dtype) * w
        elif ctx.mode == "scaled":
            grad = grad * scale
        return grad, None, None, None, None


class _NMWeight(torch.nn.Module):
    """Parametrization: the effective weight of one layer, as the owning sparsifier's phase dictates."""

    def __init__(self, owner: NMSparsifier, name: str) -> None:
        super().__init__()
        self.owner, self.name = [owner], name  # a list, so the owner is not registered as a submodule

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # (out, in)
        owner = self.owner[0]
        n, beta, mode = owner.phase(owner.t)
        m = owner.nm[1]
        if n >= m:
            return w
        mask = nm_mask(w.detach().abs(), n, m, self.name)  # (out, in) keep N of every M by |W|
        owner.masks[self.name] = mask
        return _SoftMask.apply(w, mask, beta, mode, owner.lambda_w)


class NMSparsifier(Sparsifier):
    """Base of the dense-weight N:M trainers; subclasses give ``phase(t) -> (n, beta, backward mode)``."""

    lambda_w: float = 0.0

    def __init__(self, model, optimizer=None, config=None, *, filter_fn: ParamFilter = default_filter, **kwargs):
        super().__init__(model, optimizer, config, filter_fn=filter_fn, **kwargs)
        self.nm = self.config.nm
        self.masks: dict[str, torch.Tensor] = {}
        self.final_masks: MaskSet | None = None
        modules = dict(model.named_modules())
        self._owners: dict[str, tuple[torch.nn.Module, str]] = {}
        for name, p in self.params.items():
            mod_name, _, attr = name.rpartition(".")
            if p.dim() != 2:
                raise SparselandError(f"{name!r} has shape {tuple(p.shape)}; N:M training needs 2-D weights")
            check_nm_shape(p.shape[1], self.nm[1], name)
            self._owners[name] = (modules[mod_name], attr)
        self.prepare()
        for name, (mod, attr) in self._owners.items():
            parametrize.register_parametrization(mod, attr, _NMWeight(self, name))

    @property
    def total_steps(self) -> int | None:
        return self.config.total_steps

    def prepare(self) -> None:
        """Set up the schedule from ``self.config`` (before the parametrizations first run)."""

    def phase(self, t: int) -> tuple[int, float, str]:
        raise NotImplementedError

    def effective_weight(self, name: str) -> torch.Tensor:
        """The weight the forward uses now (N:M in the sparse phases)."""
        mod, attr = self._owners[name]
        return getattr(mod, attr).detach()

    def step(self) -> None:
        """Call once after each ``optimizer.step()``; finalizes at ``total_steps``."""
        self.t += 1
        if self.final_masks is not None:
            self.final_masks.apply_()
        elif self.total_steps is not None and self.t >= self.total_steps:
            self.finalize()

    @torch.no_grad()
    def finalize(self) -> MaskSet:
        """Write the hard N:M weights into the parameters and keep that mask (gradient hooks) from now on."""
        if self.final_masks is not None:
            return self.final_masks
        n, m = self.nm
        masks = {}
        for name, (mod, attr) in self._owners.items():
            dense = getattr(mod.parametrizations, attr).original
            masks[name] = nm_mask(dense.detach().abs(), n, m, name)
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            dense.masked_fill_(~masks[name], 0.0)
        params = dict(self.model.named_parameters())
        self.final_masks = MaskSet(self.model, {name: masks[name] for name in masks if name in params})
        self.final_masks.hook_grads()
        return self.final_masks

    def remove(self) -> None:
        """Drop the parametrizations, leaving the dense weights (call ``finalize`` instead to keep N:M)."""
        if self.final_masks is not None:
            self.final_masks.unhook()
            return
        for mod, attr in self._owners.values():
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)


class SRSTE(NMSparsifier):
    """SR-STE ("Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", Zhou et al. 2021):
    the forward uses the N:M mask of the dense weights by magnitude, recomputed each step; the dense weights
    get the straight-through gradient plus the sparse-refined term lambda_W * (1 - mask) * W."""

    config_cls = SRSTEConfig

    def __init__(self, model, optimizer=None, config=None, *, filter_fn: ParamFilter = default_filter, **kwargs):
        super().__init__(model, optimizer, config, filter_fn=filter_fn, **kwargs)
        self.lambda_w = float(self.config.decay)

    def phase(self, t: int) -> tuple[int, float, str]:
        return self.nm[0], 0.0, "srste"


def structure_schedule(n: int, m: int) -> list[int]:
    """SDGF's kept counts per frame: (M-1), M/2, M/4, ... down to N (e.g. 1:8 -> 7, 4, 2, 1)."""
    counts = [m - 1]
    k = m // 2
    while k > n:
        counts.append(k)
        k //= 2
    counts.append(n)
    return sorted(set(counts), reverse=True)


class ProgressiveGradientFlow(NMSparsifier):
    """Progressive gradient flow ("Progressive Gradient Flow for Robust N:M Sparsity Training in
    Transformers", Bambhaniya et al. 2024): MDGF multiplies the pruned weights by beta(t) decaying 1 -> 0
    (linear or exponential) instead of a hard mask, so gradients reach them early and fade; SDGF steps the
    pattern (M-1):M -> ... -> N:M with binary masks. Dense phase first, hard N:M fine-tune phase last.

    As in the authors' code the dense weights get the straight-through gradient (``gradient="ste"``);
    ``gradient="scaled"`` instead scales the pruned weights' gradient by beta (the exact chain rule).
    """

    config_cls = ProgressiveGradientFlowConfig

    def __init__(
        self,
        model,
        optimizer=None,
        config=None,
        *,
        filter_fn: ParamFilter = default_filter,
        gradient: str = "ste",
        **kwargs,
    ):
        if gradient not in ("ste", "scaled"):
            raise SparselandError(f"gradient={gradient!r} must be 'ste' (the authors' code) or 'scaled'")
        self.gradient = gradient
        super().__init__(model, optimizer, config, filter_fn=filter_fn, **kwargs)

    def prepare(self) -> None:
        cfg = self.config
        self.t_dense = int(round(cfg.dense_fraction * cfg.total_steps))
        self.t_fine = int(round((1 - cfg.fine_tune_fraction) * cfg.total_steps))
        span = max(1, self.t_fine - self.t_dense)
        default = 1.0 / span if cfg.decay == "linear" else math.log(1000.0) / span
        self.decay_coef = cfg.decay_coef if cfg.decay_coef is not None else default
        self.frames = structure_schedule(*self.nm)

    def beta(self, t: int) -> float:
        """Soft-mask value of pruned weights at step t (MDGF): 1 - c s (linear) or exp(-c s), s = t - t_dense."""
        s = t - self.t_dense
        if self.config.decay == "linear":
            return max(0.0, 1.0 - self.decay_coef * s)
        return math.exp(-self.decay_coef * s)

    def phase(self, t: int) -> tuple[int, float, str]:
        n, m = self.nm
        if t < self.t_dense:
            return m, 1.0, "ste"
        if t >= self.t_fine:
            return n, 0.0, "ste"
        if self.config.decay == "structure":
            frame = (t - self.t_dense) * len(self.frames) // max(1, self.t_fine - self.t_dense)
            return self.frames[min(frame, len(self.frames) - 1)], 0.0, "ste"
        return n, self.beta(t), self.gradient
