"""MoE experts pruned with their own calibration inputs: each expert sees only the tokens the router
sends to it (its top-k), so its Wanda norms / SparseGPT Hessian come from those tokens.

transformers 5 keeps an MoE block's routed experts as 3-D parameters, ``experts.gate_up_proj``
(E, 2I, C) and ``experts.down_proj`` (E, C, I), run as ``down_e(act(gate_e x) * up_e x)`` for the
tokens routed to expert e. Each expert's gate_up and down matrices are pruned like Linears of those
shapes (``pruner.prune_weight``), gate_up from the routed tokens' inputs, down from its own
intermediate activations computed with the already-pruned gate_up (the same order as the Linears of
a block). An expert no calibration token reached keeps its own rule without statistics: magnitude.
The router stays dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Prune = Callable[[str, torch.Tensor, object | None], torch.Tensor]  # (name, W, stats) -> pruned W


def _routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, C), top_k_index (N, k)) of an experts module call, positional or by keyword."""
    vals = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
    hidden = vals[0].reshape(-1, vals[0].shape[-1])
    return hidden, vals[1].reshape(hidden.shape[0], -1)


@torch.no_grad()
def prune_experts_(
    experts: torch.nn.Module,
    prefix: str,
    prune: Prune,
    stats_of: Callable[[torch.Tensor | None], object | None],
    routed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, tuple[int, int]]:
    """Prune every expert of ``experts`` in place; ``routed``: (hidden (N, C), top_k_index (N, k)) of the
    calibration tokens (None for rules without statistics). ``stats_of(x)`` makes the statistics of inputs
    x (tokens, in), None when there are none. Returns {name: (zeros, numel)} per pruned matrix."""
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, C), (E, C, I)
    out: dict[str, tuple[int, int]] = {}
    for e in range(gate_up.shape[0]):
        x = None
        if routed is not None:
            hidden, idx = routed
            x = hidden[(idx == e).any(-1)]  # the tokens routed to expert e
            x = x if x.shape[0] > 0 else None
        name = f"{prefix}.gate_up_proj.{e}"
        gate_up.data[e] = prune(name, gate_up.data[e], stats_of(x))
        out[name] = (int((gate_up.data[e] == 0).sum()), gate_up.data[e].numel())
        h = None
        if x is not None:  # its intermediate activations, through the pruned gate_up
            g, u = F.linear(x, gate_up.data[e]).chunk(2, dim=-1)
            h = experts.act_fn(g) * u
        name = f"{prefix}.down_proj.{e}"
        down.data[e] = prune(name, down.data[e], stats_of(h))
        out[name] = (int((down.data[e] == 0).sum()), down.data[e].numel())
    return out


def expert_hook(experts: torch.nn.Module, prefix: str, prune: Prune, stats_of, done: dict) -> object:
    """A forward pre-hook that prunes ``experts`` from the tokens routed to them in this call (the
    block's one calibration pass), recording {name: (zeros, numel)} in ``done``."""

    def hook(mod, args, kwargs):
        done.update(prune_experts_(mod, prefix, prune, stats_of, _routed(args, kwargs)))

    return experts.register_forward_pre_hook(hook, with_kwargs=True)
