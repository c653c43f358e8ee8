"""Sparse attention kernels: block-sparse causal prefill and sparse decode, with PyTorch references.

Methods (``sparseland.attention``) decide *which* blocks or key positions to keep; these functions
execute a selection. Each public function runs the C++ op (``torch.ops.sparseland.*``) when
:func:`sparseland.runtime.kernels.use_kernels` is true and the op is built, else its ``*_reference``.

Conventions, shared by kernels and references (tensors float32, scale defaults to 1/sqrt(D)):

- Prefill: q (H, T, D), k, v (KVH, T, D), GQA head h uses kv head h // (H // KVH).
  ``block_mask`` bool (H, nb, nb), nb = ceil(T / block_size): query block i attends key block j.
  Causal is always enforced (key position <= query position; blocks j > i are ignored) and the
  diagonal block (i, i) is always computed, whatever the mask says, so every query row attends at
  least to itself and no row is NaN. :func:`effective_block_mask` shows the blocks actually computed.
- Decode: q (H, D), k_cache, v_cache (KVH, S, D); ``indices`` int64 (H, K) are the key positions
  each head attends, in any order, each in [0, S), without duplicates (a duplicate counts twice).
"""

from __future__ import annotations

import math

import torch

from sparseland.errors import SparselandError
from sparseland.runtime import kernels

__all__ = [
    "block_density",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_block_mask",
    "dense_decode_attention",
    "dense_decode_attention_reference",
    "effective_block_mask",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
]


def _has_op(name: str) -> bool:
    return kernels.use_kernels() and hasattr(torch.ops.sparseland, name)


def _num_blocks(T: int, block_size: int) -> int:
    if block_size < 1:
        raise SparselandError(f"block_size must be a positive integer, got {block_size}")
    return (T + block_size - 1) // block_size


def _check_float(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise SparselandError(f"{name} must be a float32 tensor, got {got}; convert it with .float()")


def _check_heads(H: int, KVH: int) -> None:
    if KVH < 1 or H % KVH:
        raise SparselandError(f"the number of query heads ({H}) must be a multiple of the KV heads ({KVH})")


# ----- block masks ----------------------------------------------------------------------------------


def dense_block_mask(H: int, T: int, block_size: int = 64) -> torch.Tensor:
    """All causal blocks on: bool (H, nb, nb), lower triangle including the diagonal."""
    nb = _num_blocks(T, block_size)
    return torch.ones(nb, nb, dtype=torch.bool).tril().expand(H, nb, nb).contiguous()


def effective_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """The blocks the kernel computes: ``block_mask`` restricted to j <= i, with the diagonal forced on."""
    nb = block_mask.shape[-1]
    return (block_mask.bool() & torch.ones(nb, nb, dtype=torch.bool).tril()) | torch.eye(nb, dtype=torch.bool)


def block_density(block_mask: torch.Tensor, T: int, block_size: int = 64) -> float:
    """Fraction of the causal (query, key) pairs, key <= query < T, that the kernel computes.

    Counts the effective mask (diagonal forced on), so a mask with only the diagonal has density
    about 1/nb and :func:`dense_block_mask` has density 1.0.
    """
    nb = _num_blocks(T, block_size)
    if block_mask.dim() != 3 or block_mask.shape[1:] != (nb, nb):
        raise SparselandError(
            f"block_mask must be (H, {nb}, {nb}) for T={T}, block_size={block_size}, got {tuple(block_mask.shape)}"
        )
    size = torch.full((nb,), block_size, dtype=torch.float64)
    size[-1] = T - (nb - 1) * block_size
    pairs = (size[:, None] * size[None, :]).tril(-1) + torch.diag(size * (size + 1) / 2)  # (nb, nb)
    computed = (effective_block_mask(block_mask).double() * pairs).sum()
    return float(computed / (block_mask.shape[0] * T * (T + 1) / 2))


# ----- prefill --------------------------------------------------------------------------------------


def _check_prefill(q, k, v, block_mask, block_size) -> None:
    _check_float(q=q, k=k, v=v)
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise SparselandError(
            f"expected q (H, T, D) and k, v (KVH, T, D), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    H, T, D = q.shape
    if k.shape[1:] != (T, D):
        raise SparselandError(f"k, v must have q's T={T} and D={D}, got {tuple(k.shape)}")
    _check_heads(H, k.shape[0])
    nb = _num_blocks(T, block_size)
    if block_mask.dtype != torch.bool or block_mask.shape != (H, nb, nb):
        raise SparselandError(
            f"block_mask must be bool (H, nb, nb) = ({H}, {nb}, {nb}) for T={T} and "
            f"block_size={block_size}, got {block_mask.dtype} {tuple(block_mask.shape)}"
        )


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Masked softmax attention per head over the token mask the blocks imply (causal, diagonal on)."""
    _check_prefill(q, k, v, block_mask, block_size)
    H, T, D = q.shape
    G = H // k.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    blocks = effective_block_mask(block_mask)  # (H, nb, nb)
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    blk = pos // block_size
    out = torch.empty_like(q)
    for h in range(H):
        allowed = blocks[h][blk[:, None], blk[None, :]] & causal  # (T, T)
        s = (q[h] @ k[h // G].T) * scale  # (T, T)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out[h] = p @ v[h // G]  # (T, D)
    return out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention computing only the (query block, key block) pairs on in ``block_mask``.

    FlashAttention-style online softmax (Dao et al., 2022) over the selected key blocks of each
    (head, query block), as in MInference / FlexPrefill's block-sparse kernels. The diagonal
    block is always computed (see the module docstring). Returns (H, T, D) float32.
    """
    _check_prefill(q, k, v, block_mask, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _has_op("block_sparse_attention"):
        return block_sparse_attention_reference(q, k, v, block_mask, block_size, scale)
    q, k, v, m = q.contiguous(), k.contiguous(), v.contiguous(), block_mask.contiguous()
    return torch.ops.sparseland.block_sparse_attention(q, k, v, m, block_size, scale)


# ----- decode ---------------------------------------------------------------------------------------


def _check_decode(q, k_cache, v_cache, indices=None) -> None:
    _check_float(q=q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 2 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.shape[2] != q.shape[1]:
        raise SparselandError(
            f"expected q (H, D) and k_cache, v_cache (KVH, S, D), got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    _check_heads(q.shape[0], k_cache.shape[0])
    if k_cache.shape[1] < 1:
        raise SparselandError("the KV cache is empty (S = 0); decode needs at least one cached position")
    if indices is None:
        return
    S = k_cache.shape[1]
    if indices.dtype != torch.int64 or indices.dim() != 2 or indices.shape[0] != q.shape[0] or indices.shape[1] < 1:
        raise SparselandError(
            f"indices must be int64 (H, K) with H={q.shape[0]} and K >= 1, got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.min() < 0 or indices.max() >= S:
        raise SparselandError(
            f"indices must lie in [0, S={S}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )


def sparse_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of each head's query over its gathered keys."""
    _check_decode(q, k_cache, v_cache, indices)
    H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = (torch.arange(H) // (H // k_cache.shape[0]))[:, None]  # (H, 1) kv head of each query head
    ks, vs = k_cache[g, indices], v_cache[g, indices]  # (H, K, D)
    p = torch.softmax(torch.einsum("hkd,hd->hk", ks, q) * scale, dim=-1)  # (H, K)
    return torch.einsum("hk,hkd->hd", p, vs)


def dense_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of each head's query over all S cached positions (GQA by reshaping q)."""
    _check_decode(q, k_cache, v_cache)
    H, D = q.shape
    KVH = k_cache.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(KVH, H // KVH, D)  # (KVH, G, D)
    p = torch.softmax(qg @ k_cache.transpose(1, 2) * scale, dim=-1)  # (KVH, G, S)
    return (p @ v_cache).reshape(H, D)


def sparse_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """One decode step attending only the key positions in ``indices`` (Quest / TidalDecode style).

    Keys are split into chunks scored in parallel and merged by their softmax statistics
    (flash-decoding). Returns (H, D) float32.
    """
    _check_decode(q, k_cache, v_cache, indices)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _has_op("sparse_decode_attention"):
        return sparse_decode_attention_reference(q, k_cache, v_cache, indices, scale)
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    return torch.ops.sparseland.sparse_decode_attention(q.contiguous(), k_cache, v_cache, indices.contiguous(), scale)


def dense_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """One decode step over all cached positions: the sparse decode kernel with every position."""
    _check_decode(q, k_cache, v_cache)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _has_op("dense_decode_attention"):
        return dense_decode_attention_reference(q, k_cache, v_cache, scale)
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    return torch.ops.sparseland.dense_decode_attention(q.contiguous(), k_cache, v_cache, scale)
