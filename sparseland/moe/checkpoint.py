"""The MoE layout in sparse checkpoints.

A MoE-fied model stores its tensors like any other (``model.layers.i.mlp.{gate,up,down}_proj.weight``
permuted, plus ``mlp.router.*`` and ``mlp.threshold``); the manifest's ``"moe"`` key maps each MoE MLP's
module name to its ``MoEMLP.spec()``. On load, ``install_moe_`` swaps the freshly built dense MLPs for
empty ``MoEMLP`` shells of that shape before the tensors are loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseland.errors import SparselandError
from sparseland.moe.module import MoEMLP, moe_layers

_INT_KEYS = ("n_shared", "expert_size", "n_routed", "router_hidden", "k", "chunk")


def moe_spec(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return {name: m.spec() for name, m in moe_layers(model).items()}


def install_moe_(model: torch.nn.Module, spec: Any, where: str = "checkpoint") -> None:
    """Replace the MLPs named in ``spec`` by empty ``MoEMLP`` shells (on the model's device)."""
    if not spec:
        return
    resave = "re-save the model with sparseland (`sparseland moefy ... --out DIR`)"
    if not isinstance(spec, dict):
        raise SparselandError(f"{where}: 'moe' is not a JSON object; {resave}")
    for name, s in spec.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SparselandError(f"{where}: MoE layer {name!r} is not a module of the model; {resave}") from None
        ok = isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] >= 0 for k in _INT_KEYS)
        ok = ok and s.get("router") in ("analytic", "learned") and s.get("routing") in ("topk", "threshold")
        gate = getattr(old, "gate_proj", None)
        if not ok or not isinstance(gate, torch.nn.Linear):
            raise SparselandError(f"{where}: MoE layer {name!r} has a bad spec {s!r}; {resave}")
        inter, hidden = gate.weight.shape
        if s["n_shared"] + s["n_routed"] * s["expert_size"] != inter or s["n_routed"] == 0:
            raise SparselandError(f"{where}: MoE layer {name!r} does not cover the MLP's {inter} neurons; {resave}")
        with torch.device(gate.weight.device):
            new = MoEMLP(hidden, inter, act_fn=old.act_fn, **{k: s[k] for k in (*_INT_KEYS, "router", "routing")})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(gate.weight.dtype))
