"""The attention kernels the methods call: the runtime's (``sparseland.runtime.attention``) when it is
installed, else the pure-PyTorch references below with the same semantics.

Batch size 1, float32: ``q`` (H, T, D), ``k``/``v`` (KVH, T, D), grouped-query heads (head ``h`` reads
KV head ``h // (H // KVH)``). Methods never contain kernels: they only build block masks / indices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ref_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int = 64, scale=None
) -> torch.Tensor:
    """Causal attention over the selected key blocks only; the diagonal block is always computed."""
    H, T, D = q.shape
    g = H // k.shape[0]
    nb = math.ceil(T / block_size)
    bm = block_mask.clone()  # (H, nb, nb)
    bm[:, torch.arange(nb), torch.arange(nb)] = True
    tok = bm.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :T, :T]  # (H, T, T)
    tok &= torch.ones(T, T, dtype=torch.bool).tril()
    kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)  # (H, T, D)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=tok, scale=scale)


def ref_sparse_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor, scale=None
) -> torch.Tensor:
    """One query per head (H, D) attending only the cached positions ``indices`` (H, K) -> (H, D)."""
    H, D = q.shape
    g = H // k_cache.shape[0]
    scale = D**-0.5 if scale is None else scale
    kv_head = torch.arange(H) // g  # (H,)
    ks = k_cache[kv_head[:, None], indices]  # (H, K, D)
    vs = v_cache[kv_head[:, None], indices]
    p = torch.softmax(torch.einsum("hd,hkd->hk", q, ks) * scale, dim=-1)  # (H, K)
    return torch.einsum("hk,hkd->hd", p, vs)


def ref_dense_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale=None):
    """One query per head (H, D) against the whole cache (KVH, S, D) -> (H, D)."""
    H, D = q.shape
    kvh = k_cache.shape[0]
    scale = D**-0.5 if scale is None else scale
    qg = q.view(kvh, H // kvh, D)  # (KVH, G, D)
    p = torch.softmax(qg @ k_cache.transpose(-1, -2) * scale, dim=-1)  # (KVH, G, S)
    return (p @ v_cache).reshape(H, D)


try:  # the runtime's kernels (C++ with torch references), written alongside this package
    from sparseland.runtime.attention import (  # type: ignore[import-not-found]
        block_sparse_attention,
        dense_decode_attention,
        sparse_decode_attention,
    )

    KERNELS = "runtime"
except ImportError:  # pragma: no cover - depends on the runtime module being present
    block_sparse_attention = ref_block_sparse_attention
    sparse_decode_attention = ref_sparse_decode_attention
    dense_decode_attention = ref_dense_decode_attention
    KERNELS = "torch-reference"
