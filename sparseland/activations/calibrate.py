"""Calibration driver: run the dense model on token windows and keep samples of its activations.

Orchestration only (hooks, batching, memory); the thresholds are computed from these samples by the
pure functions in ``core``. All methods calibrate on the *dense* model's activations, as TEAL,
CATS and CHESS do. To bound memory, each captured tensor keeps an evenly strided subset of at most
``max_tokens`` token rows (magnitudes, float32); inputs shared by several Linears (q/k/v, gate/up)
are stored once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparseland.errors import SparselandError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
_ARCH_ROLES = {"qkv": "q", "gate_up": "up", "shared_gate": "gate", "shared_up": "up", "shared_down": "down"}
_SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}


def linear_roles(
    model: torch.nn.Module, filter_fn: Callable[[torch.nn.Module, str], bool] | None = None
) -> dict[str, str]:
    """Linear name -> role (q, k, v, o, gate, up, down) for the decoder's projections, in model order,
    where ``sparseland.models.arch`` says they are. A fused projection takes the role of its input: qkv
    is ``q`` (it reads the attention input), gate_up and a plain MLP's first Linear are ``up``; an MoE
    block's shared expert has gate/up/down roles, its routers none (they stay dense)."""
    from sparseland.models.arch import describe, is_known, known

    if is_known(model):
        out = {}
        for name, role in describe(model).linear_roles().items():
            role = _ARCH_ROLES.get(role, role)
            if role in ROLES and (filter_fn is None or filter_fn(model.get_submodule(name), name)):
                out[name] = role
        if not out:
            raise SparselandError("your filter_fn selected no q/k/v/o/gate/up/down projection to sparsify")
        return out
    out = {}
    for name, mod in model.named_modules():
        role = name.rpartition(".")[2].removesuffix("_proj")
        is_proj = isinstance(mod, torch.nn.Linear) and name.endswith("_proj") and role in ROLES
        if is_proj and (filter_fn is None or filter_fn(mod, name)):
            out[name] = role
    if not out:
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise SparselandError(
            f"found no q/k/v/o/gate/up/down projections (*_proj Linears) in {type(model).__name__} (model_type "
            f"{mt!r}) to sparsify: activation sparsity supports "
            f"the architectures in sparseland/models/arch.py ({', '.join(known())}) (or your filter_fn selected none)"
        )
    return out


def input_group(name: str, role: str) -> str:
    """Key shared by Linears that read the same tensor (q/k/v; gate/up; an MoE expert's gate/up)."""
    from sparseland.activations.experts import expert_group

    group = expert_group(name)
    if group is not None:
        return group
    return name.rpartition(".")[0] + "." + _SHARED_INPUT.get(role, role)


@dataclass
class Samples:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (n, in) |x|
    gate_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # gate Linear -> (n, inter) |act(g)|
    up_means: dict[str, torch.Tensor] = field(default_factory=dict)  # up Linear -> (inter,) mean |up(x)|

    def input_of(self, name: str, role: str) -> torch.Tensor:
        return self.inputs[input_group(name, role)]


@torch.inference_mode()
def collect(
    model: torch.nn.Module,
    windows: torch.Tensor,
    inputs: dict[str, str] | None = None,
    gates: list[str] | None = None,
    ups: list[str] | None = None,
    max_tokens: int = 2048,
    batch_size: int = 2,
) -> Samples:
    """Run ``windows`` (N, T) through ``model`` and sample |inputs| of ``inputs`` (name -> role),
    |act(gate(x))| of the ``gates`` Linears, and the mean |up(x)| of the ``ups`` Linears."""
    if windows is None or windows.dim() != 2 or windows.numel() == 0:
        raise SparselandError(
            "activation sparsity needs calibration windows: pass calibration=corpus.calibration(16, 512) "
            "(a (N, T) LongTensor of token ids)"
        )
    from sparseland.activations.sites import get_state

    if get_state(model) is not None:
        raise SparselandError("calibrate on the dense model: call sparseland.activations.remove(model) first")
    n_tok = windows.shape[0] * windows.shape[1]
    stride = max(1, math.ceil(n_tok / max_tokens))
    modules = dict(model.named_modules())
    parts: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def keep_rows(v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(-1, v.shape[-1])  # (B*T, C)
        return flat[::stride].abs().float().clone()

    def pre(key: str):
        return lambda mod, args: parts.setdefault(key, []).append(keep_rows(args[0]))

    def gate_post(key: str, act):
        return lambda mod, args, out: parts.setdefault(key, []).append(keep_rows(act(out)))

    def up_post(key: str):
        def hook(mod, args, out):
            s = out.reshape(-1, out.shape[-1]).abs().float().sum(0)  # (inter,)
            sums[key] = sums.get(key, 0) + s

        return hook

    seen: set[str] = set()
    for name, role in (inputs or {}).items():
        group = input_group(name, role)
        if group not in seen:
            seen.add(group)
            handles.append(modules[name].register_forward_pre_hook(pre("in:" + group)))
    for name in gates or []:
        act = modules[name.rpartition(".")[0]].act_fn
        handles.append(modules[name].register_forward_hook(gate_post("gate:" + name, act)))
    for name in ups or []:
        handles.append(modules[name].register_forward_hook(up_post(name)))
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    out = Samples()
    for key, chunks in parts.items():
        kind, _, name = key.partition(":")
        (out.inputs if kind == "in" else out.gate_acts)[name] = torch.cat(chunks)
    out.up_means = {k: v / n_tok for k, v in sums.items()}
    return out
