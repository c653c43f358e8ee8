"""An MoE block's routed experts as one module per projection: ``ExpertList`` holds each expert's gate,
up and down projection as an ``nn.Linear`` or a ``SparseLinear`` (any runtime format: dense fp32/bf16,
bitmask, N:M, q4, q8, q4_nm, q4_bitmask) and runs the same forward as transformers' experts module
(``MixtralExperts``, ``Qwen2MoeExperts``: 3-D ``gate_up_proj`` (E, 2I, C) and ``down_proj`` (E, C, I)
parameters), so the MoE block's own forward (the router's top-k, the shared expert) runs it unchanged.

    split_experts_(model)                              # 3-D experts -> ExpertList of nn.Linear
    experts_to_sparse_runtime_(model, format="auto")   # ... of SparseLinear in a runtime format

Once split, each expert projection is an ordinary Linear named ``<block>.mlp.experts.{gate,up,down}.<e>``:
``to_sparse_runtime_`` converts it like any Linear, and activation sparsity puts a site on it (its
forward sees only the tokens the router sends to that expert). The fused decode step (``fastpath``)
reads either kind: the 3-D parameters' rows by reference (dense float32) or each expert's module.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError
from sparseland.runtime.formats import make_format, value_dtype_of
from sparseland.runtime.modules import SparseLinear

QUANT = {"q4": "int4-g32", "q8": "int8"}  # round-to-nearest schemes of the quantized expert formats


class ExpertList(torch.nn.Module):
    """Routed experts as Linears / SparseLinears: ``gate[e]``, ``up[e]`` (I, C) and ``down[e]`` (C, I)."""

    def __init__(self, gate: list, up: list, down: list, act_fn: torch.nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.ModuleList(m) for m in (gate, up, down))
        self.num_experts = len(gate)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """(N, C) tokens, (N, k) chosen experts and their weights -> (N, C): the weighted sum of the chosen
        experts' outputs, expert by expert in index order (as transformers' experts modules add them)."""
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            y = self.down[e](self.act_fn(self.gate[e](x)) * self.up[e](x))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def is_experts(mod: torch.nn.Module) -> bool:
    """transformers' 3-D experts module (``gate_up_proj`` (E, 2I, C), ``down_proj`` (E, C, I))."""
    gu, d = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor) and gu.dim() == 3 and d.dim() == 3


def expert_weights(mod: torch.nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``e``'s (gate (I, C), up (I, C), down (C, I)) of a 3-D experts module, as views."""
    gu = mod.gate_up_proj.detach()[e]
    inter = gu.shape[0] // 2
    return gu[:inter], gu[inter:], mod.down_proj.detach()[e]


def _format(w: torch.Tensor, format: str, vdt: torch.dtype) -> SparseLinear:
    from sparseland.quant.scheme import quantize_rtn
    from sparseland.runtime.quantized import make_quant_format

    if format in QUANT:
        mask = w != 0
        qw = quantize_rtn(w, QUANT[format], None if bool(mask.all()) else mask)
        return SparseLinear(make_quant_format(qw, "auto"))
    return SparseLinear(make_format(w.contiguous(), format, vdt))


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin.requires_grad_(False)


def _blocks_experts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(block, experts name in the block, experts module) of every MoE block."""
    from sparseland.models.arch import describe, is_known

    if not is_known(model) or describe(model).moe is None:
        raise SparselandError(f"{type(model).__name__} has no MoE blocks whose experts to split")
    arch = describe(model)
    name = arch.moe.experts
    return [(b, name, b.get_submodule(name)) for b in arch.blocks]


def _replace(block: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent), child, new)


def split_experts_(model: torch.nn.Module) -> int:
    """Replace every MoE block's 3-D experts module by an ``ExpertList`` of ``nn.Linear`` (copies of the
    slices; the 3-D parameters are released) in place; returns how many blocks changed (0 if already split)."""
    n = 0
    for block, name, mod in _blocks_experts(model):
        if isinstance(mod, ExpertList):
            continue
        if not is_experts(mod):
            raise SparselandError(f"{name} is a {type(mod).__name__}, not an experts module with 3-D weights")
        E = mod.gate_up_proj.shape[0]
        parts = zip(*(tuple(_linear(w) for w in expert_weights(mod, e)) for e in range(E)), strict=True)
        _replace(block, name, ExpertList(*(list(p) for p in parts), mod.act_fn))
        n += 1
    return n


def experts_to_sparse_runtime_(
    model: torch.nn.Module, format: str = "auto", value_dtype: str | torch.dtype = "float32"
) -> dict[str, int]:
    """Every MoE block's expert projections as SparseLinears in place (3-D experts are split first);
    returns {format: count}. ``format``: as ``to_sparse_runtime_`` (auto: 2:4 / bitmask / dense from the
    pruned weights), or q4 / q8 (round-to-nearest int4-g32 / int8 per channel; a pruned q4 weight keeps
    its zeros as q4_nm or q4_bitmask). Projections already in a runtime format are left as they are."""
    split_experts_(model)
    vdt, counts = value_dtype_of(value_dtype), {}
    for _, _, mod in _blocks_experts(model):
        for lst in (mod.gate, mod.up, mod.down):
            for e, lin in enumerate(lst):
                if type(lin) is torch.nn.Linear:
                    lst[e] = _format(lin.weight.detach(), format, vdt)
                name = lst[e].weight_format.name
                counts[name] = counts.get(name, 0) + 1
    return counts


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ``ExpertList`` of Linears stored as transformers' 3-D
    ``gate_up_proj`` (E, 2I, C) / ``down_proj`` (E, C, I) again, so a checkpoint of a model whose experts
    were split (by TEAL, or ``split_experts_``) loads into the transformers class. Experts in a runtime
    format (SparseLinear) are refused: save before ``experts_to_sparse_runtime_``."""
    state = model.state_dict()
    for name, mod in model.named_modules():
        if not isinstance(mod, ExpertList):
            continue
        if not all(type(m) is torch.nn.Linear for lst in (mod.gate, mod.up, mod.down) for m in lst):
            raise SparselandError(
                f"{name} holds experts in runtime formats; save the checkpoint before experts_to_sparse_runtime_ "
                "(the checkpoint stores float weights and the loader rebuilds the model's own experts)"
            )
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        gu = [torch.cat([g.weight, u.weight]) for g, u in zip(mod.gate, mod.up, strict=True)]
        state[f"{name}.gate_up_proj"] = torch.stack(gu).detach()
        state[f"{name}.down_proj"] = torch.stack([d.weight for d in mod.down]).detach()
    return state
