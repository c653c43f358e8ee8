"""One decode step for several sequences at once (continuous batching), each with its own ``LeanDecoder``.

    logits = batched_step([dec_a, dec_b, dec_c], [tok_a, tok_b, tok_c])   # (3, vocab)

Each decoder holds one sequence (its own KV cache and position, which differ). The step runs every
per-token part of the layers (embedding, norms, the q/k/v, output and MLP projections, the q/k norms,
RoPE at each sequence's own position, the final norm and lm_head) on the B new tokens together, as
one (B, C) input: the runtime's Linear kernels take (B, in) inputs and read each weight row once for
up to four rows (``dense.cpp``; the quantized formats' several-row kernels likewise), so B tokens cost
about the weight reads of one. Only attention is per sequence: each token's k and v are written into
its own decoder's cache at its position and it attends over that cache (``LeanDecoder._dense_attention``).

This is the lean loop's Python step (the reference) with B tokens in place of T; the fused C++ step
(``fastpath``) runs one sequence (one cache, one position, single-vector kernels) and is not used here.
The logits equal each decoder's own ``step`` up to float rounding (a several-row kernel sums in another
order than the single-vector one), so a greedy token can differ where two logits tie to ~1e-6.

Which decoders can join (``batch_reason``): the plain float32 KV cache, no sparse attention or
KV-cache eviction method (their state is per sequence and built in the prefill), the same model.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError
from sparseland.runtime.generate import LeanDecoder


def batch_reason(dec: LeanDecoder) -> str | None:
    """Why ``dec`` cannot join a batched step (None if it can)."""
    if dec.kv_dtype != "float32" or dec.k_cache is None:
        return f"the {dec.kv_dtype} KV cache (batched steps run the float32 cache)"
    if getattr(dec.model, "_sparseland_attention", None) is not None or any(dec.compacted):
        return "a sparse attention / KV-cache eviction method (its state is per sequence)"
    return None


class _Batch:
    """The decoders of one step, with the ``arch`` and ``_attention`` that ``LeanDecoder._block`` calls."""

    def __init__(self, decoders: list[LeanDecoder]) -> None:
        self.decoders = decoders
        self.arch = decoders[0].arch

    _block = LeanDecoder._block  # the block's norms, residuals and MLP as the lean loop runs them

    def _attention(self, i: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (1, B, C): token b belongs to decoder b. Projections and RoPE on all B; attention per decoder."""
        d0 = self.decoders[0]
        q, k, v = d0._qkv(i, attn, h)  # (1, B, H, D), (1, B, KVH, D) x 2: per-token, so any B works
        q, k = d0._rope(q.transpose(1, 2), cos, sin), d0._rope(k.transpose(1, 2), cos, sin)  # (1, H|KVH, B, D)
        v = v.transpose(1, 2)
        scale = getattr(attn, "scaling", d0.head_dim**-0.5)
        window = self.arch.windows[i]
        outs = []
        for b, dec in enumerate(self.decoders):
            k_l, v_l = dec._layer_cache(i)
            p0 = dec.pos
            k_l[:, p0], v_l[:, p0] = k[0, :, b], v[0, :, b]
            keys, vals = k_l[None, :, : p0 + 1], v_l[None, :, : p0 + 1]
            qb = q[:, :, b : b + 1].contiguous()  # (1, H, 1, D)
            outs.append(dec._dense_attention(qb, keys, vals, scale, p0, window))  # (1, 1, H * D)
        o_proj = attn.get_submodule(self.arch.family.attn_linears["o"])
        return o_proj(torch.cat(outs, dim=1))


@torch.inference_mode()
def batched_step(decoders: list[LeanDecoder], tokens: list[int]) -> torch.Tensor:
    """Feed ``tokens[b]`` to ``decoders[b]`` at its own position, all in one pass; returns the logits
    (B, vocab). The decoders must share one model and each pass ``batch_reason``."""
    if not decoders or len(decoders) != len(tokens):
        raise SparselandError(f"batched_step: {len(decoders)} decoders and {len(tokens)} tokens; give one token each")
    model = decoders[0].model
    for dec in decoders:
        why = batch_reason(dec)
        if dec.model is not model or why is not None:
            raise SparselandError(f"batched_step: a decoder cannot join the batch: {why or 'another model'}")
        if dec.pos + 1 > dec.max_len:
            raise SparselandError(f"sequence would reach {dec.pos + 1} tokens; the cache holds {dec.max_len}")
    batch = _Batch(decoders)
    arch = batch.arch
    h = arch.embed(torch.tensor([tokens]))  # (1, B, C)
    rope = decoders[0]._rotary(h, torch.tensor([[dec.pos for dec in decoders]]))  # per type: (1, 1, B, r)
    for i, block in enumerate(arch.blocks):
        h = batch._block(i, block, h, *rope[arch.layer_types[i]])
    for dec in decoders:
        if dec.fast is not None:
            dec.fast.invalidate(dec.pos)  # the Python step wrote the cache here
        dec.pos += 1
        dec.n_cached = [dec.pos] * len(dec.n_cached)
    logits = arch.lm_head(arch.final_norm(h))[0]  # (B, vocab)
    if arch.final_softcap is not None:  # Gemma 2/3
        logits = torch.tanh(logits / arch.final_softcap) * arch.final_softcap
    return logits
