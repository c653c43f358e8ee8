"""Activation sparsity per MoE expert (TEAL): each routed expert's projections get their own input
thresholds, calibrated on the tokens the router sends to that expert.

The 3-D experts of an MoE block are first split into one Linear per expert projection
(``runtime.experts.split_experts_``: ``<block>.mlp.experts.{gate,up,down}.<e>``); a Linear's forward
then sees exactly its expert's routed tokens, so the ordinary calibration hooks (``calibrate.collect``)
sample them per expert, and the ordinary input sites apply the thresholds in the Python step. gate and
up of one expert read the same input (one threshold); down reads ``act(gate x) * up x`` of that expert.

An expert that gets no calibration tokens (the router never chose it on the calibration windows) has
no samples of its own: it falls back to the samples of every expert of the same block pooled (its
block's routed inputs, or down inputs), and its name is listed in the activation state's
``expert_fallback`` (``get_state(model).expert_fallback``). Qwen2-MoE's shared expert is a plain MLP
(roles shared_gate/up/down, calibrated on every token).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from sparseland.errors import SparselandError

# <block>.mlp.experts.<proj>.<e>: its input group is per expert and input kind
_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate|up|down)\.(?P<e>\d+)$")


def expert_group(name: str) -> str | None:
    """The input group of an expert projection (gate and up of one expert share it), else None."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    kind = "down" if m["proj"] == "down" else "mlp_in"
    return f"{m['prefix']}.{m['e']}.{kind}"


def pooled_group(group: str) -> str:
    """The key under which a block's experts' samples of one input kind are pooled."""
    prefix, _, kind = group.rpartition(".")
    return f"{prefix.rpartition('.')[0]}.*.{kind}"


def expert_roles(
    model: torch.nn.Module, filter_fn: Callable[[torch.nn.Module, str], bool] | None = None
) -> dict[str, str]:
    """Expert projection name -> role (gate, up, down) of an MoE model, its 3-D experts split first
    (in place); {} for a model without MoE blocks."""
    from sparseland.models.arch import describe, is_known
    from sparseland.runtime.experts import split_experts_

    if not is_known(model) or describe(model).moe is None:
        return {}
    split_experts_(model)
    out = {}
    for name, mod in model.named_modules():
        m = _EXPERT.match(name)
        if m is not None and (filter_fn is None or filter_fn(mod, name)):
            out[name] = m["proj"]
    return out


def fill_missing(inputs: dict[str, torch.Tensor], names: list[str]) -> list[str]:
    """Give every expert projection in ``names`` samples: those whose expert got no calibration tokens
    take the pooled samples of their block's experts (``inputs`` group -> (n, C) |x|, updated in
    place). Returns the names that fell back."""
    pools: dict[str, list[torch.Tensor]] = {}
    for group, x in inputs.items():
        if expert_group_of_key(group):
            pools.setdefault(pooled_group(group), []).append(x)
    fell = [n for n in names if expert_group(n) is not None and expert_group(n) not in inputs]
    for name in fell:
        pool = pools.get(pooled_group(expert_group(name)))
        if not pool:
            raise SparselandError(
                f"no expert of the MoE block of {name} received calibration tokens; use more calibration windows"
            )
        inputs[expert_group(name)] = torch.cat(pool)
    return fell


def expert_group_of_key(group: str) -> bool:
    """Whether a Samples input key is an expert's (``<prefix>.experts.<e>.<kind>``)."""
    return re.match(r"^.+\.experts\.\d+\.(mlp_in|down)$", group) is not None
