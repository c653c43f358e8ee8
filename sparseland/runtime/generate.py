"""A lean greedy decode loop for Llama-style causal LMs (gpt-fast style): prefill, then one token at
a time through our own forward over the model's modules, with a preallocated KV cache.

No transformers ``generate`` machinery per token: the loop calls the layers' Linear (or
``SparseLinear``) modules, RMSNorms and the model's own rotary embedding directly, so its tokens
equal ``model.generate(do_sample=False)``. Batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparseland.errors import SparselandError
from sparseland.runtime import fastpath


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens only
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # all tokens after the first
    per_token_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LeanDecoder:
    """Holds the KV cache for one sequence and runs the model's blocks step by step."""

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise SparselandError(
                f"the lean decode loop supports Llama-style models (model.model.layers + rotary_emb), "
                f"not {type(model).__name__}; use `--no-sparse-runtime` / transformers generate instead"
            )
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise SparselandError("sliding-window attention is not supported by the lean decode loop")
        self.model, self.base = model, base
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        dtype = base.embed_tokens.weight.dtype
        shape = (len(base.layers), self.n_kv, max_len, self.head_dim)  # (L, KVH, T, D)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.pos = 0
        # fused C++ step for T == 1 (fastpath.py); None if the model is not eligible
        self.fast = fastpath.build_fast_step(self) if fastpath.enabled() else None

    def _attention(self, i: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        T = h.shape[1]  # h: (1, T, C)
        q = attn.q_proj(h).view(1, T, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(1, T, self.n_kv, self.head_dim)
        v = attn.v_proj(h).view(1, T, self.n_kv, self.head_dim).transpose(1, 2)  # (1, KVH, T, D)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, H, T, D), (1, KVH, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        p0, p1 = self.pos, self.pos + T
        self.k_cache[i, :, p0:p1] = k[0]
        self.v_cache[i, :, p0:p1] = v[0]
        keys = self.k_cache[i : i + 1, :, :p1]  # (1, KVH, p1, D)
        vals = self.v_cache[i : i + 1, :, :p1]
        scale = getattr(attn, "scaling", self.head_dim**-0.5)
        method = getattr(attn, "_sparseland_attention", None)  # a sparseland.attention method, if applied
        if method is not None:  # block mask -> block_sparse_attention / indices -> sparse_decode_attention
            o = method.attend(i, q[0], keys[0], vals[0], scale)  # (H, T, D)
            return attn.o_proj(o.transpose(0, 1).reshape(1, T, self.n_heads * self.head_dim))
        if T == 1:  # decode: grouped heads against the cache, no mask needed
            g = self.n_heads // self.n_kv
            qg = q.view(1, self.n_kv, g, self.head_dim)  # (1, KVH, G, D)
            probs = torch.softmax((qg @ keys.transpose(-1, -2)) * scale, dim=-1)  # (1, KVH, G, p1)
            o = (probs @ vals).reshape(1, 1, self.n_heads * self.head_dim)
        else:
            # a fresh prefill is plain causal: is_causal lets SDPA use its fused kernel (~2x faster at 8k
            # than the same mask passed explicitly); a continuation needs the offset mask
            mask = None if p0 == 0 else torch.ones(T, p1, dtype=torch.bool).tril(diagonal=p0)
            o = F.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
            o = o.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim)
        return attn.o_proj(o)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (1, T) at the current position; returns the last position's logits (vocab,)."""
        T = ids.shape[1]
        if self.pos + T > self.max_len:
            raise SparselandError(f"sequence would reach {self.pos + T} tokens; the cache holds {self.max_len}")
        h = self.base.embed_tokens(ids)  # (1, T, C)
        pos_ids = torch.arange(self.pos, self.pos + T).unsqueeze(0)
        cos, sin = self.base.rotary_emb(h, pos_ids)  # (1, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, D)
        if T == 1 and self.fast is not None and fastpath.enabled():  # all layers in one C++ call
            h = self.fast(h, cos, sin, self.pos)
        else:  # the reference path
            for i, layer in enumerate(self.base.layers):
                h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.pos += T
        return self.model.lm_head(self.base.norm(h[:, -1:]))[0, -1]


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
    model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, stop_at_eos: bool = True
) -> GenerationResult:
    """Greedy decode ``max_new_tokens`` after ``input_ids`` (1, T); same tokens as HF greedy generate."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise SparselandError(f"greedy_generate decodes one sequence; got batch {input_ids.shape[0]}")
    T = input_ids.shape[1]
    dec = LeanDecoder(model, T + max_new_tokens)
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
    return GenerationResult(tokens, T, prefill, sum(per_token), per_token)
