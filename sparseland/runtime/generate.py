"""A lean greedy decode loop for the causal LMs ``sparseland.models.arch`` describes (gpt-fast style):
prefill, then one token at a time through our own forward over the model's modules, with a
preallocated KV cache (or, for the KV-cache eviction methods SnapKV and H2O, per-layer caches
holding only the entries they keep).

No transformers ``generate`` machinery per token: the loop calls the layers' Linear (or
``SparseLinear``) modules, norms, MLP / MoE blocks and the model's own rotary embedding directly, where
the architecture layer says they are (separate or fused qkv as views, q/k norms, biases, partial
rotary, pre / sandwich / post norms, parallel residual, sliding-window layers as a window over the
cache, attention and final-logit soft-capping), so its tokens equal ``model.generate(do_sample=False)``.
Batch size 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparseland.errors import SparselandError
from sparseland.models.arch import describe
from sparseland.runtime import fastpath


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens only
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # all tokens after the first
    per_token_seconds: list[float] = field(default_factory=list)
    path: str = "python"  # "fused": the fused C++ step ran the decode steps; "python": the reference step
    path_reason: str | None = None  # why the fused step did not run (None when it did)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


KV_DTYPES = ("float32", "int8", "sparse")


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of K or V entries (..., D), one float32 scale per vector: scale = max|x| / 127,
    codes = round_half_even(x / scale) in [-127, 127]; a zero vector gets scale 0 and codes 0.
    Returns (codes int8 (..., D), scale float32 (...))."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    div = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    codes = torch.round(x / div).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (..., D) int8 and scale (...) -> codes * scale, in ``dtype``."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def kv_keep_count(keep: float, D: int) -> int:
    """Entries kept per vector by ``prune_kv``: k = ceil(keep * D) (keep in (0, 1], so 1 <= k <= D)."""
    _check_kv_keep(keep)
    return max(1, min(D, math.ceil(round(keep * D, 9))))  # round: 0.3 * 10 is 3.0000000000000004


def _check_kv_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0 < keep <= 1):
        raise SparselandError(f"kv_keep={keep!r} must be a number in (0, 1] (the fraction of head_dim entries kept)")


def prune_kv(x: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mustafar-style unstructured sparsity of K or V entries ("Mustafar: Promoting Unstructured
    Sparsity for KV Cache Pruning in LLM Inference"): per-token magnitude pruning, each vector (..., D)
    (one token of one KV head) keeps its k = ceil(keep * D) entries of largest |x| and zeros the rest
    (ties broken by ``torch.topk``), stored in a bitmap format.

    Returns (bits, values):

    * bits uint8 (..., ceil(D / 8)): one bit per entry, set for a kept nonzero entry; column
      j is bit j % 8 (least significant first) of byte j // 8.
    * values float32 (..., k): the kept entries in column order, the set bits' values; a vector with
      fewer than k nonzero kept entries (it had zeros among its top k) pads with zeros at the end.

    A fixed k per vector needs no offsets. ``unprune_kv`` inverts it."""
    D = x.shape[-1]
    k = kv_keep_count(keep, D)
    x = x.float()
    kept = torch.zeros(x.shape, dtype=torch.bool).scatter_(-1, x.abs().topk(k, dim=-1).indices, True)
    kept &= x != 0
    # the set columns first, in column order, then the rest: their first k are the packed values
    col = torch.arange(D)
    order = torch.argsort(torch.where(kept, col, col + D), dim=-1)[..., :k]
    values = torch.where(kept, x, torch.zeros((), dtype=x.dtype)).gather(-1, order)
    nbytes = (D + 7) // 8
    padded = F.pad(kept, (0, 8 * nbytes - D)).view(*x.shape[:-1], nbytes, 8).to(torch.uint8)
    bits = (padded << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return bits, values


def unprune_kv(bits: torch.Tensor, values: torch.Tensor, D: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bits uint8 (..., ceil(D / 8)) and values (..., k) from ``prune_kv`` -> the dense (..., D) vectors
    in ``dtype``: the i-th set bit of a vector takes its i-th value, every other entry is zero."""
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :D].bool()  # (..., D)
    rank = (mask.cumsum(-1) - 1).clamp_(0, values.shape[-1] - 1)  # the set bit's index among its vector's
    x = values.gather(-1, rank)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LeanDecoder:
    """Holds the KV cache for one sequence and runs the model's blocks step by step.

    ``pos`` is the rotary position (the tokens seen); ``n_cached[i]`` is the number of entries layer
    ``i``'s cache holds. They are equal unless the model's attention method evicts (SnapKV, H2O): then
    each layer keeps only the method's ``kept_positions`` after its prefill, in a cache sized for them
    plus the tokens still to come, and decodes densely over those entries. Keys are cached after RoPE,
    so they carry their positions and attention over the compacted cache is exact.

    ``kv_dtype="int8"`` keeps K and V as int8 codes (L, KVH, max_len, D) with one float32 scale per
    (layer, KV head, position) (``k_scale``/``v_scale`` (L, KVH, max_len); ``quantize_kv``): the new
    entries are quantized when written (keys after RoPE) and attention runs over the dequantized
    cache, prefill included. Dense attention only (no KV-cache eviction, no sparse attention method).

    ``kv_dtype="sparse"`` keeps a Mustafar-style unstructured sparse cache (``prune_kv``): each new
    token's K (after RoPE) and V keep, per KV head, their ``kv_keep`` fraction of head_dim entries
    of largest magnitude, stored as a bitmap ``k_bits``/``v_bits`` (L, KVH, max_len, ceil(D / 8))
    uint8 plus the kept values ``k_vals``/``v_vals`` (L, KVH, max_len, ceil(kv_keep * D)) float32.
    Attention runs over the reconstructed (zero-filled dense) cache, rebuilt every step: a reference
    implementation on the Python step (the fused C++ step does not run it). Dense attention only.
    """

    def __init__(self, model: torch.nn.Module, max_len: int, kv_dtype: str = "float32", kv_keep: float = 0.5) -> None:
        self.arch = arch = describe(model)  # SparselandError for an architecture sparseland does not know
        if kv_dtype not in KV_DTYPES:
            raise SparselandError(f"kv_dtype={kv_dtype!r} is unknown; use one of {list(KV_DTYPES)}")
        _check_kv_keep(kv_keep)
        method = getattr(model, "_sparseland_attention", None)
        if kv_dtype != "float32" and method is not None:
            kind = type(getattr(method, "config", None)).__name__
            raise SparselandError(
                f"the {kv_dtype} KV cache runs dense attention only; the model has a sparse attention / KV-cache "
                f"eviction method ({kind}): use kv_dtype='float32' (--kv-dtype float32) with it"
            )
        self.kv_dtype, self.kv_keep = kv_dtype, kv_keep
        self.model, self.base = model, arch.base
        self.n_heads, self.n_kv, self.head_dim = arch.n_heads, arch.n_kv, arch.head_dim
        self.max_len = max_len
        self.dtype = arch.embed.weight.dtype
        L = len(arch.blocks)
        self.k_cache: torch.Tensor | None = None  # (L, KVH, max_len, D), the fused step's cache
        self.v_cache: torch.Tensor | None = None
        self.k_layers: list[torch.Tensor | None] = [None] * L  # layer i's cache (KVH, capacity, D)
        self.v_layers: list[torch.Tensor | None] = [None] * L
        self.k_scale: torch.Tensor | None = None  # int8 cache: (L, KVH, max_len) float32 scales
        self.v_scale: torch.Tensor | None = None
        self.k_bits: torch.Tensor | None = None  # sparse cache: (L, KVH, max_len, ceil(D / 8)) uint8 bitmaps
        self.v_bits: torch.Tensor | None = None
        self.k_vals: torch.Tensor | None = None  # sparse cache: (L, KVH, max_len, k) float32 kept values
        self.v_vals: torch.Tensor | None = None
        if kv_dtype == "sparse":  # no k_cache: the fused step is not built
            k = kv_keep_count(kv_keep, self.head_dim)
            pos = (L, self.n_kv, max_len)
            self.k_bits = torch.zeros((*pos, (self.head_dim + 7) // 8), dtype=torch.uint8)
            self.v_bits = torch.zeros_like(self.k_bits)
            self.k_vals = torch.zeros((*pos, k), dtype=torch.float32)
            self.v_vals = torch.zeros_like(self.k_vals)
        elif kv_dtype == "int8":
            shape = (L, self.n_kv, max_len, self.head_dim)
            self.k_cache = torch.zeros(shape, dtype=torch.int8)
            self.v_cache = torch.zeros(shape, dtype=torch.int8)
            self.k_scale = torch.zeros(shape[:3], dtype=torch.float32)
            self.v_scale = torch.zeros(shape[:3], dtype=torch.float32)
            self.k_layers, self.v_layers = list(self.k_cache.unbind(0)), list(self.v_cache.unbind(0))
        elif not getattr(getattr(model, "_sparseland_attention", None), "evicts", False):
            shape = (L, self.n_kv, max_len, self.head_dim)  # (L, KVH, T, D)
            self.k_cache = torch.zeros(shape, dtype=self.dtype)
            self.v_cache = torch.zeros(shape, dtype=self.dtype)
            self.k_layers, self.v_layers = list(self.k_cache.unbind(0)), list(self.v_cache.unbind(0))
        # else: per-layer caches, allocated at prefill with only the kept entries (no full-length copy)
        self.n_cached = [0] * L
        self.compacted = [False] * L  # layer i holds an evicted (compacted) cache
        self.pos = 0
        # fused C++ step for T == 1 (fastpath.py); None if the model is not eligible, and why
        self.fast, self.fast_reason = self._decide_fast(model)
        self.fused_steps = 0  # decode steps the fused step ran

    def _decide_fast(self, model: torch.nn.Module) -> tuple[object | None, str | None]:
        """The fused step for this decoder, or None and the reason it does not run."""
        if self.k_cache is None:
            why = "KV-cache eviction keeps per-layer caches" if self.kv_dtype == "float32" else "the sparse KV cache"
            return None, f"{why} (the fused step reads one full-length cache)"
        if not fastpath.enabled():
            return None, f"the fused step is off ({fastpath.ENV}=1 or kernels.force_reference())"
        why = fastpath.ineligible_reason(model, self.k_cache)
        if why is not None:
            return None, why
        fast = fastpath.build_fast_step(self)
        why = "the layers could not be packed (their shapes differ from the config's)"
        return fast, None if fast is not None else why

    @property
    def path(self) -> str:
        """ "fused" if the fused C++ step ran a decode step, else "python"."""
        return "fused" if self.fused_steps else "python"

    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV caches now (every allocated buffer, counted once)."""
        held = {}
        sparse = (self.k_bits, self.v_bits, self.k_vals, self.v_vals)
        for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale, *sparse, *self.k_layers, *self.v_layers):
            if t is not None:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(held.values())

    def _layer_cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s full-length cache (KVH, max_len, D), allocated on first use when not shared."""
        if self.k_cache is not None:
            self.k_layers[i], self.v_layers[i] = self.k_cache[i], self.v_cache[i]
        elif self.compacted[i] or self.k_layers[i] is None:
            shape = (self.n_kv, self.max_len, self.head_dim)
            self.k_layers[i] = torch.zeros(shape, dtype=self.dtype)
            self.v_layers[i] = torch.zeros(shape, dtype=self.dtype)
        self.compacted[i] = False
        return self.k_layers[i], self.v_layers[i]

    def _compact(self, i: int, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep only the entries ``kept`` (KVH, K) of layer ``i``'s prefill keys/values (KVH, T, D), in a
        new cache with room for the tokens still to come; the full-length buffers are freed."""
        KVH, K = kept.shape  # KVH rows, or one per query head (SnapKV group="query")
        if k.shape[0] != KVH:  # each query head keeps its own entries: a cache row per query head
            k, v = (t.repeat_interleave(KVH // t.shape[0], 0) for t in (k, v))
        idx = kept.unsqueeze(-1).expand(-1, -1, self.head_dim)  # (KVH, K, D)
        capacity = K + self.max_len - k.shape[1]
        self.k_layers[i] = k.new_empty(KVH, capacity, self.head_dim)
        self.v_layers[i] = v.new_empty(KVH, capacity, self.head_dim)
        self.k_layers[i][:, :K] = k.gather(1, idx)
        self.v_layers[i][:, :K] = v.gather(1, idx)
        self.n_cached[i], self.compacted[i] = K, True
        self.fast = None  # the fused step reads the full-length cache, which no longer holds this layer
        if self.k_cache is not None and all(self.compacted):
            self.k_cache = self.v_cache = None

    def _decode_evicted(self, i: int, method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """One token through layer ``i``'s compacted cache: append after the kept entries, attend them
        all, and move the last entry into the slot the method evicts (if any). q (H, 1, D), k/v (KVH, 1, D)."""
        if q.shape[1] != 1:
            raise SparselandError(
                f"layer {i}'s KV cache was compacted by KV-cache eviction after the prefill; the lean loop then "
                f"decodes one token at a time, got {q.shape[1]}: start a new LeanDecoder for a new prompt"
            )
        if method is None or not getattr(method, "evicts", False):
            raise SparselandError(
                f"layer {i}'s KV cache was compacted by SnapKV/H2O, but the model's attention method is now "
                f"{type(getattr(method, 'config', None)).__name__}: start a new LeanDecoder after changing it"
            )
        n, k_l, v_l = self.n_cached[i], self.k_layers[i], self.v_layers[i]
        rows = k_l.shape[0]  # KV heads, or query heads for a per-query-head cache
        k_l[:, n], v_l[:, n] = (t[:, 0].repeat_interleave(rows // t.shape[0], 0) for t in (k, v))
        o, drop = method.decode_evicted(i, q[:, 0], k_l[:, : n + 1], v_l[:, : n + 1], scale, self.pos + 1)
        if drop is None:
            self.n_cached[i] = n + 1
        else:  # swap-remove: the last entry takes the evicted slot (attention ignores key order)
            r = torch.arange(rows)
            k_l[r, drop], v_l[r, drop] = k_l[:, n].clone(), v_l[:, n].clone()
        return o.unsqueeze(1)  # (H, 1, D)

    def _qkv(self, i: int, attn: torch.nn.Module, h: torch.Tensor):
        """Block ``i``'s q (1, T, H, D), k (1, T, KVH, D), v (1, T, KVH, D) from h (1, T, C): separate
        projections, or views into the fused one's output (no copies), q/k norms applied."""
        T, H, KVH, D, arch = h.shape[1], self.n_heads, self.n_kv, self.head_dim, self.arch
        layout, qk_norm = arch.family.qkv_layout, arch.family.qk_norm
        if layout == "separate":
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            qkv = attn.get_submodule(arch.family.attn_linears["qkv"])(h)
            if layout == "concat":  # Phi-3: [q | k | v] along the output
                q, k, v = qkv.split((H * D, KVH * D, KVH * D), dim=-1)
            else:  # GPT-NeoX: per head [q_h | k_h | v_h]
                q, k, v = qkv.view(1, T, H, 3 * D).chunk(3, dim=-1)
        if qk_norm == "all":  # OLMo 2: one norm over all heads' q (and k)
            q, k = attn.q_norm(q.reshape(1, T, H * D)), attn.k_norm(k.reshape(1, T, KVH * D))
        q, k, v = q.reshape(1, T, H, D), k.reshape(1, T, KVH, D), v.reshape(1, T, KVH, D)
        if qk_norm == "head":  # Qwen3 / Gemma 3: per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on x (1, H, T, D); partial rotary (GPT-NeoX) rotates the first cos.shape[-1] dims."""
        r = cos.shape[-1]
        if r == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    def _attention(self, i: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        T = h.shape[1]  # h: (1, T, C)
        q, k, v = self._qkv(i, attn, h)
        v = v.transpose(1, 2)  # (1, KVH, T, D)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, H, T, D), (1, KVH, T, D)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o_proj = attn.get_submodule(self.arch.family.attn_linears["o"])
        p0, p1 = self.pos, self.pos + T
        scale = getattr(attn, "scaling", self.head_dim**-0.5)
        method = getattr(attn, "_sparseland_attention", None)  # a sparseland.attention method, if applied
        window = self.arch.windows[i]
        if self.kv_dtype != "float32":
            if method is not None:
                raise SparselandError(
                    f"layer {i} has a sparse attention method ({type(getattr(method, 'config', None)).__name__}); "
                    f"the {self.kv_dtype} KV cache runs dense attention only: use kv_dtype='float32'"
                )
            write = self._write_int8 if self.kv_dtype == "int8" else self._write_sparse
            keys, vals = write(i, k[0], v[0], p0, p1)
            return o_proj(self._dense_attention(q, keys, vals, scale, p0, window))
        if method is not None and i in getattr(method, "arch_dense", ()):
            method = None  # sliding-window / soft-capped layers attend densely (attention.hf.dense_layers)
        if method is not None and getattr(method, "evicts", False) and p0 == 0 and T > 1:
            o = method.attend(i, q[0], k[0], v[0], scale)  # (H, T, D): dense prefill, chooses what to keep
            self._compact(i, k[0], v[0], method.kept_positions(i))
        elif self.compacted[i] and p0 > 0:
            o = self._decode_evicted(i, method, q[0], k[0], v[0], scale)  # (H, 1, D)
        else:
            k_l, v_l = self._layer_cache(i)
            k_l[:, p0:p1], v_l[:, p0:p1] = k[0], v[0]
            keys, vals = k_l[None, :, :p1], v_l[None, :, :p1]  # (1, KVH, p1, D)
            if method is not None:  # block mask -> block_sparse_attention / indices -> sparse_decode_attention
                o = method.attend(i, q[0], keys[0], vals[0], scale)  # (H, T, D)
            else:
                return o_proj(self._dense_attention(q, keys, vals, scale, p0, window))
        return o_proj(o.transpose(0, 1).reshape(1, T, self.n_heads * self.head_dim))

    def _write_int8(self, i: int, k: torch.Tensor, v: torch.Tensor, p0: int, p1: int):
        """Quantize k, v (KVH, T, D) into layer ``i``'s int8 cache at [p0, p1); returns the dequantized
        keys and values of positions [0, p1), (1, KVH, p1, D) in the model's dtype."""
        kc, ks = quantize_kv(k)
        vc, vs = quantize_kv(v)
        self.k_cache[i, :, p0:p1], self.k_scale[i, :, p0:p1] = kc, ks
        self.v_cache[i, :, p0:p1], self.v_scale[i, :, p0:p1] = vc, vs
        keys = dequantize_kv(self.k_cache[i, :, :p1], self.k_scale[i, :, :p1], self.dtype)
        vals = dequantize_kv(self.v_cache[i, :, :p1], self.v_scale[i, :, :p1], self.dtype)
        return keys[None], vals[None]

    def _write_sparse(self, i: int, k: torch.Tensor, v: torch.Tensor, p0: int, p1: int):
        """Prune k, v (KVH, T, D) into layer ``i``'s sparse cache at [p0, p1) (``prune_kv``); returns the
        reconstructed keys and values of positions [0, p1), (1, KVH, p1, D) in the model's dtype."""
        self.k_bits[i, :, p0:p1], self.k_vals[i, :, p0:p1] = prune_kv(k, self.kv_keep)
        self.v_bits[i, :, p0:p1], self.v_vals[i, :, p0:p1] = prune_kv(v, self.kv_keep)
        keys = unprune_kv(self.k_bits[i, :, :p1], self.k_vals[i, :, :p1], self.head_dim, self.dtype)
        vals = unprune_kv(self.v_bits[i, :, :p1], self.v_vals[i, :, :p1], self.head_dim, self.dtype)
        return keys[None], vals[None]

    def _dense_attention(
        self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, scale: float, p0: int, window: int | None = None
    ):
        """The loop's own attention: q (1, H, T, D) over keys/vals (1, KVH, p1, D) -> (1, T, H * D).
        ``window``: query position p sees keys p - window < k <= p (a sliding-window layer); the model's
        attention soft-capping (``cap * tanh(s / cap)`` of the scaled scores) is applied when it has one."""
        T, p1 = q.shape[2], keys.shape[2]
        cap = self.arch.attn_softcap
        if T == 1:  # decode: grouped heads against the cache, no mask needed
            if window is not None and p1 > window:  # the last `window` keys (views)
                keys, vals = keys[:, :, p1 - window :], vals[:, :, p1 - window :]
            g = self.n_heads // self.n_kv
            qg = q.view(1, self.n_kv, g, self.head_dim)  # (1, KVH, G, D)
            scores = (qg @ keys.transpose(-1, -2)) * scale  # (1, KVH, G, S)
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            probs = torch.softmax(scores, dim=-1)
            return (probs @ vals).reshape(1, 1, self.n_heads * self.head_dim)
        # a fresh prefill is plain causal: is_causal lets SDPA use its fused kernel (~2x faster at 8k
        # than the same mask passed explicitly); a continuation (or a window) needs the explicit mask
        mask = None
        if p0 > 0 or (window is not None and p1 > window) or cap is not None:
            qpos = torch.arange(p0, p1).unsqueeze(1)  # (T, 1)
            kpos = torch.arange(p1).unsqueeze(0)  # (1, p1)
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
        if cap is not None:  # soft-capping changes the scores before the softmax: no fused SDPA
            kk = keys.repeat_interleave(self.n_heads // self.n_kv, 1)
            vv = vals.repeat_interleave(self.n_heads // self.n_kv, 1)
            scores = torch.tanh((q @ kk.transpose(-1, -2)) * scale / cap) * cap  # (1, H, T, p1)
            o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv
        else:
            o = F.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
        return o.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (1, T) at the current position; returns the last position's logits (vocab,)."""
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise SparselandError(f"sequence would reach {self.pos + T} tokens; the cache holds {self.max_len}")
        arch = self.arch
        h = arch.embed(ids)  # (1, T, C); Gemma's embedding scales by sqrt(C) itself
        pos_ids = torch.arange(self.pos, self.pos + T).unsqueeze(0)
        rope = self._rotary(h, pos_ids)  # layer type -> (cos, sin), each (1, 1, T, rotary_dim)
        cos, sin = rope[arch.layer_types[0]]
        if isinstance(self.fast, fastpath.FastStep) and not self.fast.activations_current():
            # activation sparsity changed since the step copied its thresholds: re-pack it (or, if the
            # model is no longer eligible, say why and take the Python step from now on)
            self.fast, self.fast_reason = self._decide_fast(self.model)
        # the fused step runs the attention method it was built with (none, or Quest): a method applied
        # or changed after this decoder was built takes the Python step
        fused = self.fast is not None and self.fast.runs(getattr(self.model, "_sparseland_attention", None))
        if T == 1 and fused and fastpath.enabled():  # all layers in one C++ call
            types = self.fast.rope_types  # one cos/sin table per layer type it uses (Gemma 3: two)
            if len(types) > 1:
                cos, sin = (torch.cat([rope[t][j].reshape(1, -1) for t in types]) for j in (0, 1))
            h = self.fast(h, cos, sin, self.pos)
            self.fused_steps += 1
        else:  # the reference path
            if self.fast is not None:
                self.fast.invalidate(self.pos)  # it writes the cache from here on
            for i, block in enumerate(arch.blocks):
                h = self._block(i, block, h, *rope[arch.layer_types[i]])
        self.pos += T
        self.n_cached = [n if c else self.pos for n, c in zip(self.n_cached, self.compacted, strict=True)]
        logits = arch.lm_head(arch.final_norm(h[:, -1:]))[0, -1]
        if arch.final_softcap is not None:  # Gemma 2/3
            logits = torch.tanh(logits / arch.final_softcap) * arch.final_softcap
        return logits

    def _rotary(self, h: torch.Tensor, pos_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The model's own rotary embedding per layer type (Gemma 3 has a local and a global base)."""
        out = {}
        for t in dict.fromkeys(self.arch.layer_types):
            if self.arch.family.rotary_by_layer_type:
                cos, sin = self.arch.rotary(h, pos_ids, t)
            elif out:
                out[t] = next(iter(out.values()))
                continue
            else:
                cos, sin = self.arch.rotary(h, pos_ids)
            out[t] = (cos.unsqueeze(1), sin.unsqueeze(1))  # (1, 1, T, rotary_dim)
        return out

    def _block(self, i: int, block: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """One decoder block, its norms where the architecture puts them (pre / sandwich / post norms,
        GPT-NeoX's parallel residual); the MLP is the block's own module (gated, fused, plain or MoE)."""
        arch = self.arch

        def normed(slot: str, x: torch.Tensor) -> torch.Tensor:
            norm = arch.norm(block, slot)
            return x if norm is None else norm(x)

        a = normed("attn_out", self._attention(i, arch.attention(i), normed("attn_in", h), cos, sin))
        mlp = arch.mlp(i)
        if arch.parallel_residual:
            return h + a + mlp(normed("mlp_in", h))
        h = h + a
        return h + normed("mlp_out", mlp(normed("mlp_in", h)))


def _eos_ids(model: torch.nn.Module) -> set[int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
    kv_dtype: str = "float32",
    kv_keep: float = 0.5,
) -> GenerationResult:
    """Greedy decode ``max_new_tokens`` after ``input_ids`` (1, T); same tokens as HF greedy generate
    (with ``kv_dtype="float32"``; ``"int8"`` quantizes the KV cache, ``"sparse"`` prunes it to
    ``kv_keep`` of each vector's entries, see ``LeanDecoder``)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise SparselandError(f"greedy_generate decodes one sequence; got batch {input_ids.shape[0]}")
    T = input_ids.shape[1]
    dec = LeanDecoder(model, T + max_new_tokens, kv_dtype=kv_dtype, kv_keep=kv_keep)
    eos = _eos_ids(model) if stop_at_eos else set()
    t0 = time.perf_counter()
    tok = int(dec.step(input_ids).argmax())
    prefill = time.perf_counter() - t0
    tokens, per_token = [tok], []
    while len(tokens) < max_new_tokens and tok not in eos:
        t1 = time.perf_counter()
        tok = int(dec.step(torch.tensor([[tok]])).argmax())
        per_token.append(time.perf_counter() - t1)
        tokens.append(tok)
    reason = dec.fast_reason if dec.fast is None else None
    if dec.fast is not None and not dec.fused_steps and len(tokens) > 1:
        reason = "the model's attention method changed after the fused step was built"
    return GenerationResult(tokens, T, prefill, sum(per_token), per_token, dec.path, reason)


def sample_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """The next token from ``logits`` (vocab,). ``temperature == 0``: the argmax, exactly as
    ``greedy_generate`` chooses. Otherwise temperature sampling with nucleus (top-p) truncation
    ("The Curious Case of Neural Text Degeneration", Holtzman et al., 2020): p = softmax(logits / T);
    keep the smallest set of most likely tokens whose probabilities sum to at least ``top_p``,
    renormalize, and draw one with ``generator`` (seeded: the same draws every time)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise SparselandError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        p_sorted, order = probs.sort(descending=True)
        before = p_sorted.cumsum(0) - p_sorted  # the mass of the more likely tokens
        p_sorted = torch.where(before < top_p, p_sorted, torch.zeros((), dtype=p_sorted.dtype))
        p_sorted[0] = p_sorted[0].clamp_min(torch.finfo(p_sorted.dtype).tiny)  # the top token always stays
        return int(order[torch.multinomial(p_sorted, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
