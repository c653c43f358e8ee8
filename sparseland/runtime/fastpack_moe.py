"""An MoE block packed for the fused decode step (csrc/decode_moe.cpp): what ``fastpack`` adds to a layer
whose MLP is Mixtral's or Qwen2-MoE's sparse MoE block.

Names (besides the attention's): ints ``moe.experts``, ``moe.top_k``, ``moe.inter``, ``moe.norm_topk``
and, with a shared expert, ``moe.shared_inter``; tensor ``router.w`` (E, C) float32 (the router stays
dense); each expert's ``e<j>.gate``/``e<j>.up``/``e<j>.down`` as ``fastpack.linear`` packs a projection
-- views of transformers' 3-D ``gate_up_proj``/``down_proj`` rows (dense float32, by reference), or an
``ExpertList``'s Linears / SparseLinears (``runtime.experts``: bf16, bitmask, N:M, q4, q8, ...). Qwen2-MoE's
shared expert is packed by ``fastpack`` as the roles ``shared_gate``, ``shared_up``, ``shared_down``
and ``shared_expert_gate``.
"""

from __future__ import annotations

import torch

from sparseland.models.arch import Arch
from sparseland.runtime.experts import ExpertList, expert_weights, is_experts

BLOCKS = {"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock"}
ROUTERS = {"MixtralTopKRouter", "Qwen2MoeTopKRouter"}
MAX_EXPERTS, MAX_TOP_K = 1024, 64  # decode_moe.cpp's bounds


def experts(arch: Arch, i: int) -> torch.nn.Module:
    return arch.blocks[i].get_submodule(arch.moe.experts)


def expert_inter(arch: Arch, i: int) -> int:
    mod = experts(arch, i)
    if isinstance(mod, ExpertList):
        g = mod.gate[0]
        return g.weight.shape[0] if type(g) is torch.nn.Linear else g.out_features
    return mod.gate_up_proj.shape[1] // 2


def shared_inter(arch: Arch, i: int) -> int:
    """The shared expert's width (0 without one)."""
    lin = arch.linears(i).get("shared_gate")
    if lin is None:
        return 0
    mod = lin[1]
    return mod.weight.shape[0] if type(mod) is torch.nn.Linear else mod.out_features


def shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(out, in) of the shared expert's roles."""
    C, Is = arch.hidden, shared_inter(arch, 0)
    return {"shared_gate": (Is, C), "shared_up": (Is, C), "shared_down": (C, Is), "shared_expert_gate": (1, C)}


def expert_linears(arch: Arch, i: int) -> list[tuple[str, object, int, int]]:
    """(name, module or weight view, out, in) of every expert projection of block ``i``."""
    mod, C, inter = experts(arch, i), arch.hidden, expert_inter(arch, i)
    out = []
    for e in range(arch.moe.num_experts):
        parts = (mod.gate[e], mod.up[e], mod.down[e]) if isinstance(mod, ExpertList) else expert_weights(mod, e)
        dims = ((inter, C), (inter, C), (C, inter))
        out += [(f"e{e}.{r}", p, *d) for r, p, d in zip(("gate", "up", "down"), parts, dims, strict=True)]
    return out


def _pack_one(part: object, out: int, inp: int):
    from sparseland.runtime import fastpack

    if isinstance(part, torch.Tensor):  # a view of the 3-D parameters
        ok = part.dtype == torch.float32 and part.is_contiguous() and part.shape == (out, inp)
        return (fastpack.DENSE, {"w": part}) if ok else None
    return fastpack.linear(part, out, inp)


def reason(arch: Arch, i: int) -> str | None:
    """Why block ``i``'s MoE block keeps the model off the fused step (None if the step runs it)."""
    from sparseland.runtime import fastpack

    mlp, mod = arch.mlp(i), experts(arch, i)
    router = arch.blocks[i].get_submodule(arch.moe.router)
    name = type(mlp).__name__
    if name not in BLOCKS or type(router).__name__ not in ROUTERS:
        return f"layer {i} MoE block {name} is not one the fused step runs ({', '.join(sorted(BLOCKS))})"
    if not (isinstance(mod, ExpertList) or is_experts(mod)):
        return f"layer {i} experts {type(mod).__name__} are neither 3-D expert weights nor ExpertList"
    E, k = arch.moe.num_experts, int(router.top_k)
    w = router.weight
    if w.dtype != torch.float32 or tuple(w.shape) != (E, arch.hidden) or not w.is_contiguous():
        return f"layer {i} router weight is not contiguous float32 ({E}, {arch.hidden})"
    if not (0 < k <= E <= MAX_EXPERTS and k <= MAX_TOP_K):
        return f"layer {i} routes top-{k} of {E} experts; the fused step runs top-k <= {MAX_TOP_K} of <= {MAX_EXPERTS}"
    act = fastpack.act_code(mod.act_fn)
    if act is None:
        return f"layer {i} experts' activation {type(mod.act_fn).__name__} is not SiLU, GELU-tanh or GELU"
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None and fastpack.act_code(fastpack.mlp_act(shared)) != act:
        return f"layer {i} shared expert's activation differs from the routed experts'"
    for pname, part, out, inp in expert_linears(arch, i):
        packed = _pack_one(part, out, inp)
        if packed is None or packed[0] in (fastpack.ACT, fastpack.ACT_BITMASK):
            fmt = fastpack.format_name(part) if isinstance(part, torch.nn.Module) else f"3-D {part.dtype}"
            return f"layer {i} expert projection {pname} ({fmt}) is not a weight format the fused step runs for experts"
    return None


def pack(arch: Arch, i: int) -> tuple[dict[str, torch.Tensor], dict[str, int]] | None:
    """Block ``i``'s router and experts by name (tensors by reference), or None if one cannot be packed."""
    from sparseland.runtime import fastpack

    router = arch.blocks[i].get_submodule(arch.moe.router)
    tensors = {"router.w": router.weight.detach()}
    ints = {
        "moe.experts": arch.moe.num_experts,
        "moe.top_k": int(router.top_k),
        "moe.inter": expert_inter(arch, i),
        "moe.norm_topk": int(bool(getattr(router, "norm_topk_prob", True))),  # Mixtral: always
        "act_fn": fastpack.act_code(experts(arch, i).act_fn),
    }
    if shared_inter(arch, i):
        ints["moe.shared_inter"] = shared_inter(arch, i)
    for pname, part, out, inp in expert_linears(arch, i):
        packed = _pack_one(part, out, inp)
        if packed is None:
            return None
        ints[f"{pname}.kind"] = packed[0]
        tensors |= {f"{pname}.{k}": t for k, t in packed[1].items()}
    return tensors, ints
