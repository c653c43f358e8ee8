"""A fused C++ decode step for the lean loop: all decoder layers of one token (T == 1) in one call.

    fast = build_fast_step(decoder)      # None when the model is not eligible
    h = fast(h, cos, sin, pos)           # (1, 1, C) embedded token -> last layer's output

``build_fast_step`` packs each layer once, by reference and by name (``fastpack.pack_layer``), into
``torch.classes.sparseland.DecodeStep`` (csrc/decode_step.cpp and its parts), which runs the same math
as ``LeanDecoder.step``'s Python loop (the reference) with the same kernels and no per-layer dispatch.
The layouts it runs (``models.arch``): Llama, Mistral and Qwen2/Qwen3 (q/k/v biases, per-head q/k
norms), Gemma 2/3 ((1 + w) RMSNorms, sandwich norms, GELU-tanh MLP, attention soft-capping,
sliding-window layers as a window over the cache, a local and a global rotary table), OLMo 2
(post-norms, q/k norms over all heads), Phi-3 (fused qkv and gate_up run as row views of one matrix) and
GPT-NeoX (per-head fused qkv run whole and split per head, LayerNorms with biases, parallel or
sequential residual, partial rotary, non-gated GELU MLP, biases on every projection), and the MoE blocks
of Mixtral and Qwen2-MoE (csrc/decode_moe.cpp: the router's softmax top-k computed by every thread
alike, the chosen experts' gate/up rows and then their weighted down projections split across the
threads, Qwen2-MoE's sigmoid-gated shared expert; only the chosen experts' weights are read; experts as
transformers' 3-D float32 weights or as ``runtime.experts.ExpertList`` projections in any row-major
kind). The embedding (and its scale) and the final norm, lm_head and logit soft-capping stay in Python.

Weights: plain fp32 Linear, or DenseFormat fp32/bf16, BitmaskFormat, NMFormat, ActSparseFormat,
ActSparseBitmaskFormat, and the quantized Q4DenseFormat, Q8DenseFormat, Q4NMFormat and Q4BitmaskFormat.

Activation sparsity (``sparseland.activations``) runs in the fused step when every site is a
threshold site on a model converted with ``to_sparse_runtime_`` (so the Linears whose inputs are
made sparse hold an actsparse / actsparse_bitmask format): an ``input`` site zeroes the Linear's
input where ``|x| <= threshold`` and its kernel skips those inputs; a ``gate_act`` site zeroes the
gate output where ``|act(g)| <= threshold`` before ``act(g) * up`` (the up rows of zeroed channels
are not computed) and the down projection skips the zeros. The thresholds are copied when the step
is built; the step remembers the activation state it copied (``FastStep.activations_current``) and
``LeanDecoder`` rebuilds it, or falls back to the Python step, when that state changed (new sites,
new thresholds, ``activations.remove()``). The fused step does not count zeros for ``counting_zeros``
(use the Python step, ``SPARSELAND_NO_FASTPATH=1``, to count).

Quest (``sparseland.attention.QuestConfig``, with or without ``refine``) runs inside the step: the
page bounds are kept by the C++ step, and the method's decode counts are added after each call, the
same as the Python step counts them. ``LeanDecoder`` runs the fused step only while the model still
carries the method (and config) the step was built with, and calls ``invalidate(pos)`` whenever the
Python step writes the cache.

Anything the C++ step would silently skip makes the model ineligible (``ineligible_reason`` names it):
top-k (``keep``) or R-Sparse activation sites, activation-sparse formats without activation sparsity or
on a fused projection, any other forward hook, sparse attention methods other than Quest (and Quest on a
model whose windowed / soft-capped layers it leaves dense), activation sparsity on GPT-NeoX (its
non-gated MLP and per-head qkv) or on an MoE model (per-expert TEAL runs on the Python step), a bias on
an activation-sparse o/up/down, biases on a gate, an MoE block whose router, expert format or activation
it does not know, a norm, MLP or activation it does not know, a weight format it does not know, a cache
that is not float32 or int8 (the int8 KV cache, ``LeanDecoder(kv_dtype="int8")``: codes and per-(layer,
head, position) scales passed with ``set_int8_cache``; dense attention only).

One ``DecodeStep`` runs one call at a time (a mutex): two threads may share a decoder's step safely,
and two decoders (each with its own step and cache) run concurrently.

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
from sparseland.runtime import fastpack, kernels

ENV = "SPARSELAND_NO_FASTPATH"
MODE_ENV = "SPARSELAND_FASTPATH_MODE"  # threading of new fast steps: region (default) or per_matvec
MODES = {"per_matvec": 0, "region": 1}  # torch's pool per matvec / one OpenMP region per step


@functools.cache
def available() -> bool:
    """Whether the extension is built with the fused step (the version that takes layers by name)."""
    if not kernels.extension_available():
        return False
    try:
        cache = torch.zeros(1, 1, 1, 8)
        step = torch.classes.sparseland.DecodeStep(8, 8, 1, 1, 8, 1.0, cache, cache)
    except RuntimeError:  # not registered, or an older build with positional arguments
        return False
    return step._has_method("add_layer")


def extras_supported() -> bool:
    """Whether the built step runs biases, q/k norms and the other layouts (every build with ``add_layer``)."""
    return available()


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

    def __init__(
        self,
        step: object,
        mode: str = "region",
        method: object | None = None,
        heads: int = 0,
        rope_types: tuple[str, ...] = ("full_attention",),
        model: torch.nn.Module | None = None,
    ) -> None:
        from sparseland.activations.sites import get_state

        self._step = step
        self._heads = heads  # query heads, for the method's counts
        self.mode = mode
        self.method = method
        self.rope_types = rope_types  # the layer types whose cos/sin tables step() takes, in order
        self.config = None
        # the activation sparsity the step copied (its thresholds), checked before each call
        self._model = model
        self._act = fastpack.activation_fingerprint(model) if model is not None else None
        self._act_state = None if model is None else get_state(model)  # held: its id stays unique
        if method is not None:
            c = self.config = copy.deepcopy(method.config)
            step.set_quest(c.page_size, float(c.keep), c.dense_layers, float(c.refine))

    def activations_current(self) -> bool:
        """Whether the model's activation sparsity is still what the step copied when it was built
        (the same sites and thresholds, not removed or replaced)."""
        return self._model is None or fastpack.activation_fingerprint(self._model) == self._act

    def runs(self, method: object | None) -> bool:
        """Whether this step runs the attention of ``method`` (the model's current one, or None) and
        the model's current activation sparsity."""
        if not self.activations_current():
            return False
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


def ineligible_reason(model: torch.nn.Module, k_cache: torch.Tensor) -> str | None:
    """Why the fused step cannot run ``model`` (None if it can): the one place that decides fused or
    not. ``k_cache`` is the decoder's (L, KVH, T_max, D) cache (or any float tensor to ask about the model)."""
    from sparseland.activations.sites import get_state

    if not available():
        return "the C++ extension (with decode_step.cpp) is not built"
    why = fastpack.arch_reason(model, k_cache.shape[2] if k_cache.dim() == 4 else None)
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
    for i in range(len(arch.blocks)):
        why = fastpack.layer_reason(arch, i, method)
        if why is not None:
            return why
    plan = fastpack.activation_plan(model)
    return plan if isinstance(plan, str) else None


def _quest_method(model: torch.nn.Module) -> object | None:
    """The model's sparse attention method if it is Quest (which the fused step runs), else None."""
    from sparseland.attention.configs import QuestConfig

    method = getattr(model, "_sparseland_attention", None)
    return method if isinstance(getattr(method, "config", None), QuestConfig) else None


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
    inputs, gates = fastpack.activation_plan(model)  # {} and {} without activation sparsity
    arch = describe(model)
    L, H, KVH, D = len(arch.blocks), arch.n_heads, arch.n_kv, arch.head_dim
    if tuple(k_cache.shape[:2]) != (L, KVH) or k_cache.shape[3] != D or not k_cache.is_contiguous():
        return None
    rope_types = tuple(dict.fromkeys(arch.layer_types)) if arch.family.rotary_by_layer_type else arch.layer_types[:1]
    layers = [fastpack.pack_layer(arch, i, inputs, gates, list(rope_types)) for i in range(L)]
    if any(layer is None for layer in layers):
        return None
    scale = float(getattr(arch.attention(0), "scaling", D**-0.5))
    inter = fastpack.intermediate(arch)
    if scales is not None:  # int8 codes + scales; the float cache arguments are empty (T_max 0) placeholders
        k_cache = v_cache = torch.empty(L, KVH, 0, D)
    step = torch.classes.sparseland.DecodeStep(arch.hidden, inter, H, KVH, D, scale, k_cache, v_cache)
    for tensors, ints, floats in layers:
        step.add_layer(tensors, ints, floats)
    if scales is not None:
        step.set_int8_cache(decoder_or_model.k_cache, decoder_or_model.v_cache, *scales)
    return FastStep(step, mode, _quest_method(model), H, rope_types, model)
