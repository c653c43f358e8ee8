"""Sites: where an activation is made sparse, its calibrated rule, and the hooks that apply it.

A ``Site`` belongs to one ``nn.Linear`` (by module name) and is one of:

- ``where="input"``: the Linear's input ``x`` (..., in) is masked before the product. The mask keeps
  ``|x| > threshold`` (threshold () or (in,)), or, with ``keep`` set, the ``keep`` largest
  ``|x| * scale`` per token (WINA top-k). With ``lr_a``/``lr_b`` the dropped part goes through a
  low-rank copy of the weight (R-Sparse).
- ``where="gate_act"``: the Linear is an MLP gate projection; its output ``g`` is zeroed where
  ``|act(g)| <= threshold`` (CATS, CHESS), so ``act(g) * up`` -- the down projection's input -- is
  sparse, and the matching rows of up/gate need not be computed.

The state hangs off the model as ``model._sparseland_activations`` (a plain attribute, not part of
``state_dict``, so weight checkpoints are unchanged). Hooks are ordinary forward (pre-)hooks, so
parameter names stay those of the dense model.

Runtime hook: ``activation_thresholds(model)`` maps each Linear name to ``(where, threshold)`` --
exactly what a thresholding activation-sparse matvec needs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseland.activations import core
from sparseland.errors import SparselandError

ATTR = "_sparseland_activations"


@dataclass
class Site:
    module: str  # name of the nn.Linear in model.named_modules()
    where: str  # "input" | "gate_act"
    threshold: torch.Tensor | None = None  # () or (C,) float32; keep |v| > threshold
    scale: torch.Tensor | None = None  # (C,) top-k score multiplier (WINA column norms)
    keep: int | None = None  # per-token top-k count (replaces threshold)
    lr_a: torch.Tensor | None = None  # (out, r) R-Sparse low-rank factor
    lr_b: torch.Tensor | None = None  # (r, in)

    def mask(self, v: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask for v (..., C)."""
        if self.keep is not None:
            scores = v.abs() if self.scale is None else core.wina_scores(v, self.scale)
            return core.topk_mask(scores, self.keep)
        assert self.threshold is not None
        return core.threshold_mask(v, self.threshold)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("threshold", "scale", "lr_a", "lr_b")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class ActivationState:
    config: dict[str, Any]  # the method config's to_dict()
    sites: list[Site]
    handles: list[Any] = field(default_factory=list)
    counts: dict[str, list[int]] | None = None  # module -> [zeros, total] while measuring
    # MoE experts (activations/experts.py) that got no calibration tokens: thresholds from their block's pool
    expert_fallback: list[str] = field(default_factory=list)

    def by_module(self) -> dict[str, Site]:
        return {s.module: s for s in self.sites}


def _count(state: ActivationState, name: str, keep: torch.Tensor) -> None:
    if state.counts is not None:
        c = state.counts.setdefault(name, [0, 0])
        c[0] += int((~keep).sum())
        c[1] += keep.numel()


def _input_hook(state: ActivationState, site: Site):
    def pre_hook(mod: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]  # (..., in)
        keep = site.mask(x)
        _count(state, site.module, keep)
        return (x * keep.to(x.dtype), *args[1:])

    return pre_hook


def _rsparse_hook(state: ActivationState, site: Site):
    def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (..., in), the original input
        keep = site.mask(x)
        _count(state, site.module, keep)
        return core.rsparse_linear(x, mod.weight, mod.bias, keep, site.lr_a, site.lr_b)

    return hook


def _gate_hook(state: ActivationState, site: Site, act):
    def hook(mod: torch.nn.Module, args: tuple, g: torch.Tensor) -> torch.Tensor:
        keep = site.mask(act(g))  # (..., inter)
        _count(state, site.module, keep)
        return g * keep.to(g.dtype)  # act(0) == 0 for SiLU/GELU/ReLU

    return hook


def install(model: torch.nn.Module, config: dict[str, Any], sites: list[Site]) -> ActivationState:
    """Remove any earlier activation sparsity from ``model`` and hook ``sites`` in."""
    remove(model)
    modules = dict(model.named_modules())
    state = ActivationState(config=json.loads(json.dumps(config)), sites=sites)  # JSON-normal form
    for site in sites:
        mod = modules.get(site.module)
        if not (isinstance(mod, torch.nn.Linear) or hasattr(mod, "weight_format")):  # Linear or SparseLinear
            raise SparselandError(f"activation site {site.module!r} is not a Linear of this model; wrong model?")
        if site.where == "input":
            if site.lr_a is not None:
                state.handles.append(mod.register_forward_hook(_mark(_rsparse_hook(state, site))))
            else:
                state.handles.append(mod.register_forward_pre_hook(_mark(_input_hook(state, site))))
        elif site.where == "gate_act":
            parent = modules.get(site.module.rpartition(".")[0])
            act = getattr(parent, "act_fn", None)
            if act is None:
                raise SparselandError(f"{site.module!r} has no parent MLP with an act_fn; gate sites need one")
            state.handles.append(mod.register_forward_hook(_mark(_gate_hook(state, site, act))))
        else:
            raise SparselandError(f"unknown site kind {site.where!r}; expected 'input' or 'gate_act'")
    setattr(model, ATTR, state)
    return state


def _mark(hook):
    hook._sparseland_activation = True  # how ``remove`` finds our hooks, also on a deep copy of the model
    return hook


def remove(model: torch.nn.Module) -> None:
    """Undo activation sparsity: remove the hooks and the state (the weights were never touched).

    Hooks are found on the modules by their mark, not through stored handles: a ``copy.deepcopy`` of
    the model carries copies of the hooks whose handles would point at the original's modules.
    """
    for mod in model.modules():
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "_sparseland_activation", False)]:
                del hooks[key]
    if hasattr(model, ATTR):
        delattr(model, ATTR)


def get_state(model: torch.nn.Module) -> ActivationState | None:
    return getattr(model, ATTR, None)


def activation_thresholds(model: torch.nn.Module) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Runtime hook: Linear name -> (where, threshold () or (C,)); threshold is None for top-k sites."""
    state = get_state(model)
    return {} if state is None else {s.module: (s.where, s.threshold) for s in state.sites}


@contextlib.contextmanager
def counting_zeros(model: torch.nn.Module) -> Iterator[dict[str, list[int]]]:
    """Inside the block the hooks count what they zero: yields ``module -> [zeros, total]``, filled as
    the model runs (stays empty for a model without activation sparsity)."""
    state = get_state(model)
    counts: dict[str, list[int]] = {}
    if state is not None:
        state.counts = counts
    try:
        yield counts
    finally:
        if state is not None:
            state.counts = None


def site_fractions(counts: dict[str, list[int]]) -> dict[str, float]:
    """``counting_zeros`` counts -> fraction zeroed per site."""
    return {k: z / max(n, 1) for k, (z, n) in counts.items()}


@torch.inference_mode()
def measure_sparsity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 2) -> dict[str, float]:
    """Fraction of zeroed entries per site while running ``windows`` (N, T) through the model."""
    state = get_state(model)
    if state is None:
        raise SparselandError("the model has no activation sparsity; apply a config with sparsify_ first")
    with counting_zeros(model) as counts:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size])
    return site_fractions(counts)
