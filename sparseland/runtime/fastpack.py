"""What the fused decode step (``fastpath.py``, csrc/decode_step.cpp) can run, and each layer packed by
name for ``DecodeStep.add_layer``: the architecture layer (``models.arch``) says where the norms,
projections, q/k norms, windows and rotary tables are; this module checks each against what the C++ step
implements and hands over references (no copies) to the weights.

A layer is three dicts: tensors (norms ``attn_in``/``attn_out``/``mlp_in``/``mlp_out``, projection
tensors ``<role>.<part>`` such as ``q.w`` or ``down.mask``, thresholds ``<role>.thr`` and
``gate.act_thr``, biases ``q.bias``, ``q_norm``/``k_norm``), ints (``<role>.kind``, ``qk_norm``,
``act_fn``, ``window``, ``rope``) and floats (``<norm>_eps``, ``norm_offset``, ``qk_eps``, ``softcap``).
Roles: ``q k v`` or ``qkv`` (Phi-3's fused [q | k | v], or GPT-NeoX's [q_h k_h v_h] per head), ``o``,
``gate up`` or ``gate_up`` (Phi-3's fused [gate | up]) or ``up`` alone (GPT-NeoX's non-gated MLP),
``down``. GPT-NeoX adds LayerNorms with biases (ints ``layernorm``), ``qkv_per_head``, ``parallel``
(parallel residual), ``rope_dim`` (partial rotary) and biases on ``o``/``up``/``down``.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError
from sparseland.models.arch import NORM_SLOTS, Arch, describe
from sparseland.runtime import fastpack_moe
from sparseland.runtime.formats import (
    ActSparseBitmaskFormat,
    ActSparseFormat,
    BitmaskFormat,
    DenseFormat,
    NMFormat,
)
from sparseland.runtime.modules import SparseLinear

# RMSNorm classes the step runs, with the offset of their scale: Gemma's is (1 + w)
NORMS = {
    "LlamaRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    "Phi3RMSNorm": 0.0,
    "Olmo2RMSNorm": 0.0,
    "MixtralRMSNorm": 0.0,
    "Qwen2MoeRMSNorm": 0.0,
    "Gemma2RMSNorm": 1.0,
    "Gemma3RMSNorm": 1.0,
}
LAYERNORMS = {"LayerNorm"}  # torch's, with or without a bias (GPT-NeoX)
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Phi3MLP", "Olmo2MLP", "Gemma2MLP", "Gemma3MLP"}
MLPS |= {"GPTNeoXMLP"}
# DecodeStep's act_fn: 0 SiLU, 1 GELU with the tanh approximation, 2 exact GELU
ACTS = {"SiLU": 0, "SiLUActivation": 0, "GELUTanh": 1, "PytorchGELUTanh": 1, "NewGELUActivation": 1}
ACTS |= {"GELUActivation": 2}
BIASED = ("q", "k", "v", "qkv", "o", "up", "down")  # projections whose biases the fused step adds
ROW_BIASED = ("o", "up", "down")  # added by the row-major kernels' run (not the activation-sparse kinds)
FUSED = ("qkv", "gate_up")  # views of one packed matrix: the row-major kinds only
DENSE, BITMASK, NM4, ACT, ACT_BITMASK, Q4, Q8, Q4NM, Q4BITMASK = 0, 1, 2, 3, 4, 5, 6, 7, 8
ACT_FORMATS = (ActSparseFormat, ActSparseBitmaskFormat)

Packed = tuple[int, dict[str, torch.Tensor]]


def linear(mod: torch.nn.Module, out: int, inp: int, bias: bool = False) -> Packed | None:
    """(kind, named tensors) of one projection with weight (out, inp), or None if the C++ step cannot
    run it. ``bias``: a bias is allowed (q/k/v: the step adds it, ``bias_of``)."""
    if mod.bias is not None and (not bias or bias_of(mod, out) is None):
        return None
    if type(mod) is torch.nn.Linear:
        w = mod.weight.detach()
        if w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (out, inp):
            return None
        return DENSE, {"w": w}
    if type(mod) is not SparseLinear or (mod.out_features, mod.in_features) != (out, inp):
        return None
    f = mod.weight_format
    quant = _quant_linear(f)
    if quant is not None:
        return quant
    vals = {
        DenseFormat: "weight",
        BitmaskFormat: "values",
        NMFormat: "values",
        ActSparseFormat: "wt",
        ActSparseBitmaskFormat: "values",
    }.get(type(f))
    if vals is None or getattr(f, vals).dtype not in (torch.float32, torch.bfloat16):
        return None
    if type(f) is DenseFormat:
        return DENSE, {"w": f.weight}
    if type(f) is BitmaskFormat:
        return BITMASK, {"mask": f.mask, "row_ptr": f.row_ptr, "values": f.values}
    if type(f) is ActSparseFormat:  # W^T (in, out)
        return (ACT, {"w": f.wt}) if f.wt.is_contiguous() else None
    if type(f) is ActSparseBitmaskFormat:
        return ACT_BITMASK, {"mask": f.mask, "row_ptr": f.row_ptr, "values": f.values}
    return NM4, {"mask": f.mask, "values": f.values}  # NMFormat: always 4 kept per mask byte (1:2, 2:4, 4:8)


def bias_of(mod: torch.nn.Module, out: int) -> torch.Tensor | None:
    """The projection's bias as contiguous float32 (out,), an empty tensor without one, None if unusable."""
    b = getattr(mod, "bias", None)
    if b is None:
        return torch.empty(0)
    b = b.detach()
    return b.contiguous() if b.dtype == torch.float32 and b.shape == (out,) else None


def _quant_linear(f: object) -> Packed | None:
    """(kind, named tensors) of a quantized format the C++ step runs (csrc/qmatvec.h), else None."""
    from sparseland.runtime.qformats import Q4DenseFormat, Q8DenseFormat
    from sparseland.runtime.qsparse import Q4BitmaskFormat, Q4NMFormat

    if type(f) is Q8DenseFormat:
        return Q8, {"codes": f.codes, "scale": f.scale}
    if type(f) not in (Q4DenseFormat, Q4NMFormat, Q4BitmaskFormat):
        return None
    named = {"codes": f.codes, "scale": f.scale} | ({} if f.offset is None else {"offset": f.offset})
    if type(f) is Q4DenseFormat:
        return Q4, named
    if type(f) is Q4NMFormat:
        return Q4NM, {"mask": f.mask} | named
    return Q4BITMASK, {"mask": f.mask, "row_ptr": f.row_ptr} | named


def is_act(mod: torch.nn.Module) -> bool:
    return type(mod) is SparseLinear and isinstance(mod.weight_format, ACT_FORMATS)


def format_name(mod: torch.nn.Module) -> str:
    return mod.weight_format.name if type(mod) is SparseLinear else type(mod).__name__


def shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection role, from the architecture's widths."""
    C, HD, KD, inter = arch.hidden, arch.n_heads * arch.head_dim, arch.n_kv * arch.head_dim, intermediate(arch)
    moe = fastpack_moe.shapes(arch) if arch.moe is not None else {}
    return moe | {
        "q": (HD, C),
        "k": (KD, C),
        "v": (KD, C),
        "qkv": (HD + 2 * KD, C),
        "o": (C, HD),
        "gate": (inter, C),
        "up": (inter, C),
        "gate_up": (2 * inter, C),
        "down": (C, inter),
    }


def intermediate(arch: Arch) -> int:
    """The MLP width: the down projection's input features (MoE: the wider of an expert and the shared one)."""
    if arch.moe is not None:
        return max(fastpack_moe.expert_inter(arch, 0), fastpack_moe.shared_inter(arch, 0))
    down = arch.linears(0)["down"][1]
    return down.weight.shape[1] if type(down) is torch.nn.Linear else down.in_features


def eps_of(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def mlp_act(mlp: torch.nn.Module) -> torch.nn.Module | None:
    """The MLP's activation module (``act_fn``; Phi-3: ``activation_fn``; GPT-NeoX: ``act``)."""
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None) or getattr(mlp, "act", None)


def act_code(act: torch.nn.Module | None) -> int | None:
    """DecodeStep's act_fn for an activation module, or None if the step does not run it."""
    if type(act) is torch.nn.GELU:  # exact or tanh, by its own setting
        return {"none": 2, "tanh": 1}.get(act.approximate)
    return ACTS.get(type(act).__name__)


def _norm_kind(norm: torch.nn.Module) -> tuple[str, float] | None:
    """("rms", scale offset) or ("layer", 0) of a float32 norm the step runs, else None."""
    name = type(norm).__name__
    if getattr(norm, "weight", None) is None or norm.weight.dtype != torch.float32:
        return None
    if name in LAYERNORMS:
        b = norm.bias
        ok = tuple(norm.normalized_shape) == tuple(norm.weight.shape) and (b is None or b.dtype == torch.float32)
        return ("layer", 0.0) if ok else None
    return ("rms", NORMS[name]) if name in NORMS else None


def arch_reason(model: torch.nn.Module, max_len: int | None) -> str | None:
    """Why the model's architecture keeps it off the fused step (None if the step runs its layout)."""
    try:
        arch = describe(model)
    except SparselandError as e:
        return str(e)
    f = arch.family
    if f.qkv_layout == "per_head" and arch.n_kv != arch.n_heads:
        return f"{arch.name} has a per-head fused qkv with {arch.n_kv} KV heads for {arch.n_heads} query heads"
    if f.mlp_kind not in ("gated", "gated_fused", "plain", "moe"):
        return f"{arch.name} has a {f.mlp_kind} MLP; the fused step runs a gated, a plain or an MoE MLP"
    other = [r for r in arch.biases if r not in BIASED]
    if other:
        return f"{arch.name} has biases on its {'/'.join(other)} projections (the fused step adds {'/'.join(BIASED)})"
    if arch.rotary_dim % 2 or not 0 < arch.rotary_dim <= arch.head_dim:
        return f"{arch.name} rotates {arch.rotary_dim} of {arch.head_dim} dims; the fused step needs an even count"
    return None


def layer_reason(arch: Arch, i: int, method: object | None) -> str | None:
    """Why block ``i`` keeps the model off the fused step (None if the step runs it)."""
    layer, attn, mlp = arch.blocks[i], arch.attention(i), arch.mlp(i)
    own = getattr(attn, "_sparseland_attention", None)
    if own is not method:
        kind = type(getattr(own, "config", None)).__name__
        return f"layer {i} has a sparse attention method the fused step does not run ({kind}; Quest only)"
    norms = [arch.norm(layer, s) for s in NORM_SLOTS] + list(arch.qk_norms(i) or ())
    norms = [n for n in norms if n is not None]
    for norm in norms:
        if _norm_kind(norm) is None:
            return f"layer {i} norm {type(norm).__name__} is not a float32 RMSNorm or LayerNorm the fused step knows"
    if len({_norm_kind(n) for n in norms}) > 1:
        return f"layer {i} mixes norm kinds (RMSNorm w, 1 + w, LayerNorm)"
    qk = arch.qk_norms(i)
    if qk and eps_of(qk[0]) != eps_of(qk[1]):
        return f"layer {i} q and k norms have different eps"
    if arch.moe is not None:
        why = fastpack_moe.reason(arch, i)
        if why is not None:
            return why
    elif type(mlp).__name__ not in MLPS or act_code(mlp_act(mlp)) is None:
        return f"layer {i} MLP {type(mlp).__name__} is not an MLP with SiLU, GELU-tanh or GELU the fused step knows"
    dims = shapes(arch)
    for role, (name, mod) in arch.linears(i).items():
        out, inp = dims[role]
        packed = linear(mod, out, inp, bias=role in BIASED)
        if packed is None:
            return f"layer {i} {name} ({format_name(mod)}) is not a weight format the fused step runs"
        if role in FUSED and packed[0] in (ACT, ACT_BITMASK):
            return f"layer {i} {name} is fused and activation-sparse ({format_name(mod)}); split projections only"
        if role in ROW_BIASED and mod.bias is not None and packed[0] in (ACT, ACT_BITMASK):
            return f"layer {i} {name} has a bias and an activation-sparse format ({format_name(mod)})"
    return None


def pack_layer(
    arch: Arch, i: int, inputs: dict, gates: dict, rope_types: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]] | None:
    """Block ``i`` by name for ``DecodeStep.add_layer`` (tensors by reference), or None if a projection's
    shape differs from the config's. ``inputs``/``gates``: the activation plan's thresholds."""
    layer, attn, dims = arch.blocks[i], arch.attention(i), shapes(arch)
    tensors: dict[str, torch.Tensor] = {}
    ints: dict[str, int] = {}
    floats: dict[str, float] = {}
    for slot in NORM_SLOTS:
        norm = arch.norm(layer, slot)
        if norm is not None:
            tensors[slot] = norm.weight.detach().contiguous()
            floats[f"{slot}_eps"] = eps_of(norm)
            kind, floats["norm_offset"] = _norm_kind(norm)
            if kind == "layer":
                ints["layernorm"] = 1
                if norm.bias is not None:
                    tensors[f"{slot}.bias"] = norm.bias.detach().contiguous()
    shared: list[torch.Tensor] = []
    no_shared_expert = arch.moe is not None and fastpack_moe.shared_inter(arch, i) == 0  # width 0: adds 0
    for role, (_, mod) in arch.linears(i).items():
        if no_shared_expert and role.startswith("shared_"):
            continue
        out, inp = dims[role]
        packed = linear(mod, out, inp, bias=role in BIASED)
        if packed is None:
            return None
        ints[f"{role}.kind"] = packed[0]
        tensors |= {f"{role}.{part}": t for part, t in packed[1].items()}
        thr = inputs.get((i, role))
        if thr is not None:
            tensors[f"{role}.thr"] = _share_equal(shared, thr)
        if role in BIASED and mod.bias is not None:
            b = bias_of(mod, out)
            if role == "qkv" and arch.family.qkv_layout == "per_head":  # [q_h k_h v_h] per head, as the rows
                tensors["qkv.bias"] = b
            elif role == "qkv":  # views of the fused bias, [q | k | v]
                b = dict(zip(("q", "k", "v"), b.split((dims["q"][0], dims["k"][0], dims["v"][0])), strict=True))
                tensors |= {f"{r}.bias": t for r, t in b.items()}
            else:
                tensors[f"{role}.bias"] = b
    if i in gates:
        tensors["gate.act_thr"] = gates[i]
    qk = arch.qk_norms(i)
    if qk is not None:
        ints["qk_norm"] = 1 if arch.family.qk_norm == "head" else 2
        tensors["q_norm"], tensors["k_norm"] = (n.weight.detach().contiguous() for n in qk)
        floats["qk_eps"] = eps_of(qk[0])
        floats["norm_offset"] = NORMS[type(qk[0]).__name__]
    if arch.moe is not None:
        moe = fastpack_moe.pack(arch, i)
        if moe is None:
            return None
        tensors |= moe[0]
        ints |= moe[1]
    else:
        ints["act_fn"] = act_code(mlp_act(arch.mlp(i)))
    if arch.family.qkv_layout == "per_head":
        ints["qkv_per_head"] = 1
    if arch.parallel_residual:
        ints["parallel"] = 1
    if arch.rotary_dim != arch.head_dim:
        ints["rope_dim"] = arch.rotary_dim
    if arch.windows[i] is not None:
        ints["window"] = int(arch.windows[i])
    ints["rope"] = rope_types.index(arch.layer_types[i]) if len(rope_types) > 1 else 0
    if arch.attn_softcap is not None:
        floats["softcap"] = float(arch.attn_softcap)
    if getattr(attn, "scaling", arch.head_dim**-0.5) != getattr(arch.attention(0), "scaling", arch.head_dim**-0.5):
        return None
    return tensors, ints, floats


def _share_equal(tensors: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``t``, or an equal tensor already in ``tensors`` (the C++ step gathers inputs once for Linears that
    read the same tensor with the same threshold: q/k/v, gate/up)."""
    for u in tensors:
        if u.shape == t.shape and torch.equal(u, t):
            return u
    tensors.append(t)
    return t


ActivationPlan = tuple[dict[tuple[int, str], torch.Tensor], dict[int, torch.Tensor]]


def _python_only_activations(arch: Arch) -> str | None:
    """Why activation sparsity on this architecture runs on the Python step only (None: it need not)."""
    if arch.moe is not None:  # per-expert thresholds (activations/experts.py) on ExpertList Linears
        return f"activation sparsity on {arch.name} (an MoE model) runs on the Python step only"
    if arch.family.mlp_kind == "plain" or arch.family.qkv_layout == "per_head":
        return f"activation sparsity on {arch.name} (non-gated MLP, per-head qkv) runs on the Python step only"
    return None


def activation_plan(model: torch.nn.Module) -> ActivationPlan | str:
    """The model's activation sites as thresholds for the fused step: ``({(layer, role): (in,) input
    threshold}, {layer: (I,) gate_act threshold})``, or why it cannot run them."""
    from sparseland.activations.sites import get_state

    state, arch = get_state(model), describe(model)
    if state is not None and (why := _python_only_activations(arch)):
        return why
    if state is None:
        for i in range(len(arch.blocks)):
            for name, mod in arch.linears(i).values():
                if is_act(mod):
                    return (
                        f"layer {i} {name} has an activation-sparse format ({format_name(mod)}) "
                        "but the model has no activation sparsity installed (its inputs are dense; use format='dense')"
                    )
        return {}, {}
    for site in state.sites:  # rules the C++ step does not implement, named first
        if site.keep is not None:
            return (
                f"activation site {site.module} keeps a per-token top-k (keep={site.keep}, WINA mode='topk'); "
                "the fused step runs threshold sites only"
            )
        if site.lr_a is not None or site.lr_b is not None:
            return f"activation site {site.module} is R-Sparse (low-rank part); the fused step runs thresholds only"
        if site.threshold is None:
            return f"activation site {site.module} has no threshold"
    names = {id(m): n for n, m in model.named_modules()}
    where = {names[id(mod)]: (i, role) for i in range(len(arch.blocks)) for role, (_, mod) in arch.linears(i).items()}
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    seen: set[tuple[str, str]] = set()
    for site in state.sites:
        if site.module not in where:
            return f"activation site {site.module} is not a projection of a decoder layer"
        if (site.module, site.where) in seen:
            return f"activation site {site.module} ({site.where}) appears twice"
        seen.add((site.module, site.where))
        i, role = where[site.module]
        mod = arch.linears(i)[role][1]
        if role in FUSED:
            return f"activation site {site.module} is on a fused projection ({role}); the fused step runs split ones"
        hooks = mod._forward_pre_hooks if site.where == "input" else mod._forward_hooks
        if not any(_is_marked(h) for h in hooks.values()):
            return f"activation site {site.module} has no hook installed (the Python step would not apply it)"
        if site.where == "input":
            if not is_act(mod):
                return (
                    f"activation site {site.module} is a {format_name(mod)} layer; run to_sparse_runtime_(model) "
                    "so the layers with sparse inputs get an actsparse format"
                )
            n = mod.in_features
        elif site.where == "gate_act":
            if role != "gate":
                return f"gate_act site {site.module} is not an MLP gate_proj"
            down = arch.linears(i)["down"][1]
            if not is_act(down):
                return (
                    f"gate_act site {site.module}: its down_proj is a {format_name(down)} layer; run "
                    "to_sparse_runtime_(model) so it gets an actsparse format"
                )
            n = mod.out_features
        else:
            return f"activation site {site.module} has an unknown kind {site.where!r}"
        t = site.threshold.detach().to(torch.float32).reshape(-1)  # threshold_mask compares in x's dtype
        if t.numel() not in (1, n):
            return f"activation site {site.module}: threshold has {t.numel()} values, expected 1 or {n}"
        t = t.expand(n).contiguous()
        if site.where == "input":
            inputs[(i, role)] = t
        else:
            gates[i] = t
    # hooks on the layers: only the sites' own (checked above); anything else makes the model ineligible
    kinds = {(s.module, s.where) for s in state.sites}
    for name, m in arch.blocks.named_modules():
        full = names[id(m)]
        for kind, hooks in (("input", m._forward_pre_hooks), ("gate_act", m._forward_hooks)):
            if any(not _is_marked(h) or (full, kind) not in kinds for h in hooks.values()):
                return f"layers.{name} has forward hooks"
    return inputs, gates


def _is_marked(hook: object) -> bool:
    return bool(getattr(hook, "_sparseland_activation", False))


def activation_fingerprint(model: torch.nn.Module) -> tuple | None:
    """What the fused step copied from the model's activation sparsity when it was packed: the state
    object and each site's rule and threshold (identity and in-place version); None without any."""
    from sparseland.activations.sites import get_state

    state = get_state(model)
    if state is None:
        return None
    return (id(state), tuple((s.module, s.where, s.keep, id(s.threshold), _version(s.threshold)) for s in state.sites))


def _version(t: object) -> int | None:
    try:
        return t._version if isinstance(t, torch.Tensor) else None
    except RuntimeError:  # an inference tensor has no version counter
        return None
