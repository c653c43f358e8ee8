"""A fused C++ decode step for the lean loop: all decoder layers of one token (T == 1) in one call.

    fast = build_fast_step(decoder)      # None when the model is not eligible
    h = fast(h, cos, sin, pos)           # (1, 1, C) embedded token -> last layer's output

``build_fast_step`` packs each layer's RMSNorm weights and its seven Linear / ``SparseLinear`` weights
(plain fp32 Linear, or DenseFormat fp32/bf16, BitmaskFormat, NMFormat, ActSparseFormat,
ActSparseBitmaskFormat, the quantized Q4DenseFormat, Q8DenseFormat, Q4NMFormat and Q4BitmaskFormat) once,
by reference, into
``torch.classes.sparseland.DecodeStep``
(csrc/decode_step.cpp), which runs the same math as ``LeanDecoder.step``'s Python loop (the
reference) with the same kernels and no per-layer dispatch.

Activation sparsity (``sparseland.activations``) runs in the fused step when every site is a
threshold site on a model converted with ``to_sparse_runtime_`` (so the Linears whose inputs are
made sparse hold an actsparse / actsparse_bitmask format): an ``input`` site zeroes the Linear's
input where ``|x| <= threshold`` and its kernel skips those inputs; a ``gate_act`` site zeroes the
gate output where ``|silu(g)| <= threshold`` before ``silu(g) * up`` (the up rows of zeroed channels
are not computed) and the down projection skips the zeros. The thresholds are copied when the step
is built: re-build it (a new ``LeanDecoder``) after changing the sites. The fused step does not count
zeros for ``counting_zeros`` (use the Python step, ``SPARSELAND_NO_FASTPATH=1``, to count).

Quest (``sparseland.attention.QuestConfig``, with or without ``refine``) runs inside the step: the
page bounds are kept by the C++ step, and the method's decode counts are added after each call, the
same as the Python step counts them. ``LeanDecoder`` runs the fused step only while the model still
carries the method (and config) the step was built with, and calls ``invalidate(pos)`` whenever the
Python step writes the cache.

Anything the C++ step would silently skip makes the model ineligible: top-k (``keep``) or R-Sparse
activation sites, activation-sparse formats without activation sparsity, any other forward hook,
sparse attention methods other than Quest, any layout but Llama's (``models.arch``: fused qkv / gate_up,
q/k norms, biases, partial rotary, sandwich / post norms, soft-capping, MoE, a sliding window shorter
than the cache; ``ineligible_reason`` names which), a non-SiLU MLP or a non-RMSNorm norm, a weight format it
does not know, a cache that is not float32 or int8 (the int8 KV cache, ``LeanDecoder(kv_dtype="int8")``:
codes and per-(layer, head, position) scales passed with ``set_int8_cache``; dense attention only).

Disabled by ``SPARSELAND_NO_FASTPATH=1`` and inside ``kernels.force_reference()``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator

import torch

from sparseland.errors import SparselandError
from sparseland.models.arch import describe
from sparseland.runtime import kernels
from sparseland.runtime.formats import (
    ActSparseBitmaskFormat,
    ActSparseFormat,
    BitmaskFormat,
    DenseFormat,
    NMFormat,
)
from sparseland.runtime.modules import SparseLinear

ENV = "SPARSELAND_NO_FASTPATH"
MODE_ENV = "SPARSELAND_FASTPATH_MODE"  # threading of new fast steps: region (default) or per_matvec
MODES = {"per_matvec": 0, "region": 1}  # torch's pool per matvec / one OpenMP region per step
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_BIASED = ("q", "k", "v")  # projections whose biases the fused step adds (set_layer_extras)
_ACTS = {"SiLU", "SiLUActivation"}
_DENSE, _BITMASK, _NM4, _ACT, _ACT_BITMASK, _Q4, _Q8, _Q4NM, _Q4BITMASK = 0, 1, 2, 3, 4, 5, 6, 7, 8
_ACT_FORMATS = (ActSparseFormat, ActSparseBitmaskFormat)
# a layer's seven projections, in DecodeStep's order
_PROJS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_GATE = 4


def available() -> bool:
    """Whether the extension is built with the fused step."""
    if not kernels.extension_available():
        return False
    try:
        torch.classes.sparseland.DecodeStep  # noqa: B018  (raises RuntimeError if not registered)
    except RuntimeError:
        return False
    return True


@functools.cache
def extras_supported() -> bool:
    """Whether the built ``DecodeStep`` adds q/k/v biases and per-head q/k norms (``set_layer_extras``,
    a later C++ change than the extension may have been built with)."""
    if not available():
        return False
    C = 8
    w = [torch.ones(C), torch.ones(C)] + [torch.zeros(C, C) for _ in range(7)]
    cache = torch.zeros(1, 1, 1, C)
    step = torch.classes.sparseland.DecodeStep(w, [1, C, C, 1, 1, C] + [0] * 15, [1.0, 1e-6, 1e-6], cache, cache)
    return step._has_method("set_layer_extras")


def enabled() -> bool:
    """Whether fast steps run now (not disabled by the env var or ``force_reference``)."""
    return os.environ.get(ENV, "") in ("", "0") and kernels.use_kernels()


@contextlib.contextmanager
def use(enabled: bool = True, mode: str | None = None) -> Iterator[None]:
    """Inside the block, fast steps are on or off (and new ones use threading ``mode``), through the
    env vars this module reads; their previous values are restored afterwards."""
    new = {ENV: "0" if enabled else "1", **({MODE_ENV: mode} if mode is not None else {})}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FastStep:
    """The packed model; call it with the embedded token, the position's cos/sin and the position.
    ``method`` is the model's sparse attention method (Quest) it runs, with ``config`` a copy of its
    config at build time; None for dense attention."""

    def __init__(self, step: object, mode: str = "region", method: object | None = None, heads: int = 0) -> None:
        self._step = step
        self._heads = heads  # query heads, for the method's counts
        self.mode = mode
        self.method = method
        self.config = None
        if method is not None:
            c = self.config = copy.deepcopy(method.config)
            step.set_quest(c.page_size, float(c.keep), c.dense_layers, float(c.refine))

    def runs(self, method: object | None) -> bool:
        """Whether this step runs the attention of ``method`` (the model's current one, or None)."""
        if method is None or self.method is None:
            return method is self.method
        return method is self.method and method.config == self.config

    def invalidate(self, pos: int) -> None:
        """The cache is being rewritten from ``pos`` on (by the Python step): drop Quest's page bounds there."""
        if self.method is not None:
            self._step.invalidate(pos)

    def _count(self, pos: int) -> None:
        """Add one step's decode counts at position ``pos`` to the method's stats, as the Python step's
        Quest selection counts them (``SparseAttention._decode``)."""
        from sparseland.attention.decode import quest_pages

        m, c = self.method, self.config
        H, S = self._heads, pos + 1
        n_layers = self._step.num_layers()
        n_pages = quest_pages(c.keep, S, c.page_size)
        sparse = max(0, n_layers - c.dense_layers)
        kept = (n_layers - sparse) * H * S + sparse * H * (n_pages * c.page_size + S % c.page_size)
        m._count("decode", kept, n_layers * H * S)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise SparselandError(f"fast-step threading mode {mode!r} is unknown; use one of {sorted(MODES)}")
        self._mode = mode

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        # h (1, 1, C), cos/sin (..., D) for position pos; a copy of h is updated in place and returned
        x = h.reshape(-1).clone()
        x = self._step.step(x, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(), pos, MODES[self._mode])
        if self.method is not None:
            self._count(pos)
        return x.view(h.shape)


def _linear(mod: torch.nn.Module, out: int, inp: int, bias: bool = False) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, tensors) of one projection with weight (out, inp), or None if the C++ step cannot run it.
    ``bias``: a bias is allowed (q/k/v: the step adds it, ``_bias``)."""
    if mod.bias is not None and (not bias or _bias(mod, out) is None):
        return None
    if type(mod) is torch.nn.Linear:
        w = mod.weight.detach()
        if w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (out, inp):
            return None
        return _DENSE, [w]
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
        return _DENSE, [f.weight]
    if type(f) is BitmaskFormat:
        return _BITMASK, [f.mask, f.row_ptr, f.values]
    if type(f) is ActSparseFormat:  # W^T (in, out)
        return (_ACT, [f.wt]) if f.wt.is_contiguous() else None
    if type(f) is ActSparseBitmaskFormat:
        return _ACT_BITMASK, [f.mask, f.row_ptr, f.values]
    return _NM4, [f.mask, f.values]  # NMFormat: always 4 kept per mask byte (1:2, 2:4, 4:8)


def _bias(mod: torch.nn.Module, out: int) -> torch.Tensor | None:
    """The projection's bias as contiguous float32 (out,), an empty tensor without one, None if unusable."""
    b = getattr(mod, "bias", None)
    if b is None:
        return torch.empty(0)
    b = b.detach()
    return b.contiguous() if b.dtype == torch.float32 and b.shape == (out,) else None


def _quant_linear(f: object) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, tensors) of a quantized format the C++ step runs (csrc/qmatvec.h), else None."""
    from sparseland.runtime.qformats import Q4DenseFormat, Q8DenseFormat
    from sparseland.runtime.qsparse import Q4BitmaskFormat, Q4NMFormat

    if type(f) is Q8DenseFormat:
        return _Q8, [f.codes, f.scale]
    if type(f) not in (Q4DenseFormat, Q4NMFormat, Q4BitmaskFormat):
        return None
    offset = f.offset if f.offset is not None else torch.empty(0, dtype=torch.float16)
    if type(f) is Q4DenseFormat:
        return _Q4, [f.codes, f.scale, offset]
    if type(f) is Q4NMFormat:
        return _Q4NM, [f.mask, f.codes, f.scale, offset]
    return _Q4BITMASK, [f.mask, f.row_ptr, f.codes, f.scale, offset]


def _is_act(mod: torch.nn.Module) -> bool:
    return type(mod) is SparseLinear and isinstance(mod.weight_format, _ACT_FORMATS)


def _format_name(mod: torch.nn.Module) -> str:
    return mod.weight_format.name if type(mod) is SparseLinear else type(mod).__name__


def _is_marked(hook: object) -> bool:
    return bool(getattr(hook, "_sparseland_activation", False))


ActivationPlan = tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor]]


def _activation_plan(model: torch.nn.Module) -> ActivationPlan | str:
    """The model's activation sites as thresholds for the fused step: ``({(layer, projection): (in,)
    input threshold}, {layer: (I,) gate_act threshold})``, or why it cannot run them."""
    from sparseland.activations.sites import get_state

    state = get_state(model)
    layers = describe(model).blocks
    if state is None:
        for i, layer in enumerate(layers):
            for p in _PROJS:
                if _is_act(layer.get_submodule(p)):
                    return (
                        f"layer {i} {p} has an activation-sparse format ({_format_name(layer.get_submodule(p))}) "
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
    where: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        for j, p in enumerate(_PROJS):
            where[names[id(layer.get_submodule(p))]] = (i, j)
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    seen: set[tuple[str, str]] = set()
    for site in state.sites:
        if site.module not in where:
            return f"activation site {site.module} is not a q/k/v/o/gate/up/down projection of a decoder layer"
        if (site.module, site.where) in seen:
            return f"activation site {site.module} ({site.where}) appears twice"
        seen.add((site.module, site.where))
        i, j = where[site.module]
        layer = layers[i]
        mod = layer.get_submodule(_PROJS[j])
        hooks = mod._forward_pre_hooks if site.where == "input" else mod._forward_hooks
        if not any(_is_marked(h) for h in hooks.values()):
            return f"activation site {site.module} has no hook installed (the Python step would not apply it)"
        if site.where == "input":
            if not _is_act(mod):
                return (
                    f"activation site {site.module} is a {_format_name(mod)} layer; run to_sparse_runtime_(model) "
                    "so the layers with sparse inputs get an actsparse format"
                )
            n = mod.in_features
        elif site.where == "gate_act":
            if j != _GATE:
                return f"gate_act site {site.module} is not an MLP gate_proj"
            down = layer.mlp.down_proj
            if not _is_act(down):
                return (
                    f"gate_act site {site.module}: its down_proj is a {_format_name(down)} layer; run "
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
            inputs[(i, j)] = t
        else:
            gates[i] = t
    # hooks on the layers: only the sites' own (checked above); anything else makes the model ineligible
    kinds = {(s.module, s.where) for s in state.sites}
    for name, m in layers.named_modules():
        full = names[id(m)]
        for kind, hooks in (("input", m._forward_pre_hooks), ("gate_act", m._forward_hooks)):
            if any(not _is_marked(h) or (full, kind) not in kinds for h in hooks.values()):
                return f"layers.{name} has forward hooks"
    return inputs, gates


def _share_equal(tensors: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``t``, or an equal tensor already in ``tensors`` (the C++ step gathers inputs once for Linears that
    read the same tensor with the same threshold: q/k/v, gate/up)."""
    for u in tensors:
        if u.shape == t.shape and torch.equal(u, t):
            return u
    tensors.append(t)
    return t


def _quest_method(model: torch.nn.Module) -> object | None:
    """The model's sparse attention method if it is Quest (which the fused step runs), else None."""
    from sparseland.attention.configs import QuestConfig

    method = getattr(model, "_sparseland_attention", None)
    return method if isinstance(getattr(method, "config", None), QuestConfig) else None


def _arch_reason(model: torch.nn.Module, max_len: int | None) -> str | None:
    """Why the model's architecture keeps it off the fused step (None if its layout is Llama's)."""
    try:
        arch = describe(model)
    except SparselandError as e:
        return str(e)
    f = arch.family
    if f.qkv_layout != "separate":
        return f"{arch.name} has a fused qkv projection ({f.qkv_layout}); the fused step takes separate q/k/v"
    if f.mlp_kind != "gated":
        return f"{arch.name} has a {f.mlp_kind} MLP; the fused step runs a gated SiLU MLP"
    if f.placement != "pre" or arch.parallel_residual:
        return f"{arch.name} has {f.placement} norms; the fused step runs pre-norm blocks"
    if f.qk_norm not in (None, "head"):
        return f"{arch.name} has q/k norms over all heads ({f.qk_norm}); the fused step runs per-head ones"
    other = [r for r in arch.biases if r not in _BIASED]
    if other:
        return f"{arch.name} has biases on its {'/'.join(other)} projections (the fused step adds q/k/v biases only)"
    if (f.qk_norm or arch.biases) and not extras_supported():
        what = "q/k norms" if f.qk_norm else "q/k/v biases"
        return f"{arch.name} has {what}; this build of the C++ step has no DecodeStep.set_layer_extras to run them"
    if arch.rotary_dim != arch.head_dim:
        return f"{arch.name} has partial rotary ({arch.rotary_dim} of {arch.head_dim} dims)"
    if arch.attn_softcap is not None or arch.final_softcap is not None:
        return f"{arch.name} soft-caps its attention scores or logits"
    windows = [w for w in arch.windows if w is not None]
    if windows and (max_len is None or min(windows) < max_len):  # a window as long as the cache never bites
        return f"{arch.name} has sliding-window layers (window {min(windows)}) shorter than the KV cache"
    return None


def ineligible_reason(model: torch.nn.Module, k_cache: torch.Tensor) -> str | None:
    """Why the fused step cannot run ``model`` (None if it can): the one place that decides fused or
    not. ``k_cache`` is the decoder's (L, KVH, T_max, D) cache (or any float tensor to ask about the model)."""
    from sparseland.activations.sites import get_state

    if not available():
        return "the C++ extension (with decode_step.cpp) is not built"
    why = _arch_reason(model, k_cache.shape[2] if k_cache.dim() == 4 else None)
    if why is not None:
        return why
    mods = torch.nn.modules.module
    if mods._global_forward_hooks or mods._global_forward_pre_hooks:
        return "global forward hooks are registered"
    arch = describe(model)
    if get_state(model) is None:
        for name, m in arch.blocks.named_modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return f"layers.{name} has forward hooks"
    if k_cache.dtype not in (torch.float32, torch.int8) or arch.embed.weight.dtype != torch.float32:
        return "the model is not float32"
    method = _quest_method(model)
    if method is not None and getattr(method, "arch_dense", None):
        return "Quest leaves this model's sliding-window / soft-capped layers dense; the fused step runs it on all"
    if k_cache.dtype == torch.int8 and method is not None:
        return "Quest in the fused step needs a float32 KV cache (its page bounds are float); use kv_dtype='float32'"
    for i, layer in enumerate(arch.blocks):
        attn, mlp = layer.self_attn, layer.mlp
        own = getattr(attn, "_sparseland_attention", None)
        if own is not method:
            kind = type(getattr(own, "config", None)).__name__
            return f"layer {i} has a sparse attention method the fused step does not run ({kind}; Quest only)"
        qk = (attn.q_norm, attn.k_norm) if arch.family.qk_norm else ()
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, *qk):
            if type(norm).__name__ not in _NORMS or norm.weight.dtype != torch.float32:
                return f"layer {i} norm {type(norm).__name__} is not a float32 Llama RMSNorm"
        if qk and qk[0].variance_epsilon != qk[1].variance_epsilon:
            return f"layer {i} q and k norms have different eps"
        if type(mlp).__name__ not in _MLPS or type(getattr(mlp, "act_fn", None)).__name__ not in _ACTS:
            return f"layer {i} MLP {type(mlp).__name__} is not a SiLU-gated Llama MLP"
        for j, p in enumerate(_PROJS):
            mod = layer.get_submodule(p)
            out, inp = mod.weight.shape if type(mod) is torch.nn.Linear else (mod.out_features, mod.in_features)
            if _linear(mod, out, inp, bias=j < 3) is None:
                return f"layer {i} {p} ({_format_name(mod)}) is not a weight format the fused step runs"
    plan = _activation_plan(model)
    return plan if isinstance(plan, str) else None


def build_fast_step(
    decoder_or_model: object,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    mode: str | None = None,
) -> FastStep | None:
    """Pack a ``LeanDecoder`` (its model and KV cache) or a model with ``k_cache``/``v_cache``
    (L, KVH, T_max, D) for the fused step; None if the model is not eligible. ``mode``: threading
    with more than one torch thread (``MODES``; default ``$SPARSELAND_FASTPATH_MODE`` or region)."""
    mode = mode or os.environ.get(MODE_ENV) or "region"
    if mode not in MODES:
        raise SparselandError(f"fast-step threading mode {mode!r} is unknown; use one of {sorted(MODES)}")
    scales = None  # (k_scale, v_scale) of an int8 cache
    if hasattr(decoder_or_model, "k_cache") and hasattr(decoder_or_model, "base"):
        model = decoder_or_model.model
        k_cache, v_cache = decoder_or_model.k_cache, decoder_or_model.v_cache
        if k_cache is not None and k_cache.dtype == torch.int8:
            scales = (decoder_or_model.k_scale, decoder_or_model.v_scale)
    else:
        model = decoder_or_model
        if k_cache is None or v_cache is None:
            raise SparselandError("build_fast_step(model) needs k_cache and v_cache; or pass a LeanDecoder")
        if k_cache.dtype == torch.int8:
            raise SparselandError(
                "build_fast_step(model, k_cache, v_cache) takes float32 caches; for an int8 cache pass the "
                "LeanDecoder(kv_dtype='int8') (its codes and scales)"
            )
    if ineligible_reason(model, k_cache) is not None:
        return None
    inputs, gates = _activation_plan(model)  # {} and {} without activation sparsity
    cfg, layers = model.config, describe(model).blocks
    H = cfg.num_attention_heads
    KVH = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    C = cfg.hidden_size
    inter = layers[0].mlp.gate_proj.out_features
    if tuple(k_cache.shape[:2]) != (len(layers), KVH) or k_cache.shape[3] != D or not k_cache.is_contiguous():
        return None
    scale = getattr(layers[0].self_attn, "scaling", D**-0.5)
    tensors: list[torch.Tensor] = []
    meta = [len(layers), C, inter, H, KVH, D]  # then per layer: 7 kinds, 7 input-threshold flags, gate flag
    feps = [float(scale)]
    shapes = [(H * D, C), (KVH * D, C), (KVH * D, C), (C, H * D), (inter, C), (inter, C), (C, inter)]
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "scaling", D**-0.5) != scale:
            return None
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        tensors += [ln1.weight.detach().contiguous(), ln2.weight.detach().contiguous()]
        feps += [float(ln1.variance_epsilon), float(ln2.variance_epsilon)]
        projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        kinds, flags, shared = [], [], []
        for j, (mod, (out, inp)) in enumerate(zip(projs, shapes, strict=True)):
            packed = _linear(mod, out, inp, bias=j < 3)
            if packed is None:
                return None
            kinds.append(packed[0])
            tensors += packed[1]
            thr = inputs.get((i, j))
            flags.append(int(thr is not None))
            if thr is not None:
                tensors.append(_share_equal(shared, thr))
        gate = gates.get(i)
        if gate is not None:
            tensors.append(gate)
        meta += kinds + flags + [int(gate is not None)]
    if scales is None:
        step = torch.classes.sparseland.DecodeStep(tensors, meta, feps, k_cache, v_cache)
    else:  # int8 codes + scales; the float cache arguments are empty (T_max 0) placeholders
        empty = torch.empty(len(layers), KVH, 0, D)
        step = torch.classes.sparseland.DecodeStep(tensors, meta, feps, empty, empty)
        step.set_int8_cache(k_cache, v_cache, *scales)
    has_qk_norm = describe(model).family.qk_norm == "head"  # the layout says so, not a stray attribute
    for i, layer in enumerate(layers):  # q/k/v biases (Qwen2), per-head q/k norms (Qwen3)
        attn, none = layer.self_attn, torch.empty(0)
        qn = getattr(attn, "q_norm", None) if has_qk_norm else None
        biases = [_bias(m, n) for m, n in ((attn.q_proj, H * D), (attn.k_proj, KVH * D), (attn.v_proj, KVH * D))]
        if qn is None and all(b.numel() == 0 for b in biases):
            continue
        norms = (
            (none, none) if qn is None else (qn.weight.detach().contiguous(), attn.k_norm.weight.detach().contiguous())
        )
        step.set_layer_extras(i, *biases, *norms, float(qn.variance_epsilon) if qn is not None else 0.0)
    return FastStep(step, mode, _quest_method(model), H)
