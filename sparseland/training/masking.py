"""Masks that survive training: the one primitive every sparse trainer here builds on.

A ``MaskSet`` maps parameter names to boolean keep-masks. Kept exactly through any optimizer by two
moves: gradients are multiplied by the mask before the step (so momentum and Adam moments of pruned
weights stay zero), and the weights are multiplied by the mask after the step (so weight decay or any
update rule that moves a zero is undone). Methods that regrow weights (SET, RigL) also call
``reset_optimizer_state`` so a regrown weight starts with fresh momentum, as those papers do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sparseland.errors import SparselandError

ParamFilter = Callable[[str, torch.nn.Parameter], bool]


_ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")  # MoE routers (models/arch.py), kept dense


def default_filter(name: str, param: torch.nn.Parameter) -> bool:
    """Sparsify 2-D weights of Linear layers inside the blocks; leave embeddings, norms, lm_head and MoE
    routers dense (an MoE block's 3-D expert tensors are not masked by default either)."""
    dense = "embed" in name or "lm_head" in name or name.endswith(_ROUTERS)
    return param.dim() == 2 and not dense and name.endswith(".weight")


class MaskSet:
    """Boolean keep-masks by parameter name, applied to one model."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            if name not in params:
                raise SparselandError(f"mask for unknown parameter {name!r}")
            if mask.shape != params[name].shape or mask.dtype != torch.bool:
                raise SparselandError(
                    f"mask for {name!r} must be bool of shape {tuple(params[name].shape)}; "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
        self.model = model
        self.masks = masks
        self.params = {name: params[name] for name in masks}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_zeros(cls, model: torch.nn.Module, names: Iterable[str] | None = None) -> MaskSet:
        """Masks from a pruned model: keep every entry that is nonzero now (default: ``default_filter``)."""
        params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if default_filter(n, p)]
        return cls(model, {n: params[n].detach() != 0 for n in names})

    def density(self) -> float:
        """Kept fraction over all masked parameters."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return kept / total if total else 1.0

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked-out weight (call after each optimizer step)."""
        for name, p in self.params.items():
            p.masked_fill_(~self.masks[name], 0.0)  # +0.0, never the -0.0 a product leaves

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of masked-out weights (call before each optimizer step)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(~self.masks[name], 0.0)

    def hook_grads(self) -> None:
        """Register gradient hooks that mask gradients as they are computed (alternative to mask_grads_)."""
        self.unhook()
        for name, p in self.params.items():
            mask = self.masks[name]
            self._hooks.append(p.register_hook(lambda g, m=mask: g.masked_fill(~m, 0.0)))

    def unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def check(self) -> None:
        """Raise if any masked-out weight is nonzero (the invariant tests and checkpoints rely on)."""
        for name, p in self.params.items():
            bad = int((p.detach()[~self.masks[name]] != 0).sum())
            if bad:
                raise SparselandError(f"{bad} masked-out weights of {name!r} are nonzero")


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, where: torch.Tensor) -> None:
    """Zero every per-parameter optimizer buffer (momentum, Adam moments) at ``where`` (bool, param's shape)."""
    state = optimizer.state.get(param, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[where] = 0
