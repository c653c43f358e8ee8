"""Prefill patterns: pure functions from one layer's q/k to a block mask (H, nb, nb) per head.

Query block ``i`` attends key block ``j`` where the mask is True (only ``j <= i`` matters; the kernel
enforces causality and always computes the diagonal block). Batch size 1: ``q`` (H, T, D),
``k`` (KVH, T, D) before the grouped-query repeat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def n_blocks(T: int, block_size: int) -> int:
    return math.ceil(T / block_size)


def causal_blocks(nb: int) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool).tril()  # (nb, nb)


def block_pair_counts(T: int, block_size: int) -> torch.Tensor:
    """Number of causal query-key pairs inside each block (nb, nb): the unit of measured sparsity."""
    nb = n_blocks(T, block_size)
    n = torch.full((nb,), float(block_size))
    n[-1] = T - (nb - 1) * block_size  # tokens per block; the last may be partial
    counts = (n.view(-1, 1) * n.view(1, -1)).tril(-1)  # (nb, nb) full blocks below the diagonal
    return counts + torch.diag(n * (n + 1) / 2)


def _expand(k: torch.Tensor, H: int) -> torch.Tensor:
    return k.repeat_interleave(H // k.shape[0], 0)  # (H, T, D)


def _pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of positions: (H, T, D) -> (H, nb, D); the last block may be partial."""
    H, T, D = x.shape
    nb = n_blocks(T, block_size)
    xp = F.pad(x, (0, 0, 0, nb * block_size - T)).view(H, nb, block_size, D).sum(2)
    counts = torch.full((nb,), float(block_size))
    counts[-1] = T - (nb - 1) * block_size
    return xp / counts.view(1, nb, 1)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest: (H, nb, nb) -> (H, nb, nb) int64."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(scores.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def _force_diagonal(scores: torch.Tensor) -> torch.Tensor:
    nb = scores.shape[-1]
    scores = scores.masked_fill(~causal_blocks(nb), float("-inf"))
    scores[:, torch.arange(nb), torch.arange(nb)] = float("inf")
    return scores


def keep_topk(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per query block ``i`` keep the ``counts[i]`` highest causal scores (the diagonal always first)."""
    nb = scores.shape[-1]
    return (_ranks(_force_diagonal(scores)) < counts.view(1, nb, 1)) & causal_blocks(nb)


def keep_cumulative(
    probs: torch.Tensor, threshold: float, cap: torch.Tensor | None = None, sink: bool = False
) -> torch.Tensor:
    """Per query block keep the smallest set of causal blocks whose share of the row's mass reaches
    ``threshold``, largest first (the diagonal, and with ``sink`` the first block, come first), at most
    ``cap[i]`` blocks."""
    H, nb, _ = probs.shape
    causal = causal_blocks(nb)
    p = probs.masked_fill(~causal, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    key = p.clone()
    if sink:
        key[:, :, 0] = 2.0
    key[:, torch.arange(nb), torch.arange(nb)] = 3.0
    order = key.argsort(dim=-1, descending=True, stable=True)
    sorted_p = p.gather(-1, order)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the blocks ranked above
    keep_sorted = before < threshold - 1e-6 if threshold < 1 else torch.ones_like(before, dtype=torch.bool)
    if cap is not None:
        keep_sorted &= torch.arange(nb).view(1, 1, nb) < cap.view(1, nb, 1)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & causal


def row_cap(nb: int, density: float) -> torch.Tensor:
    """Blocks allowed per query block so each row keeps about ``density`` of its causal blocks (>= 1)."""
    return torch.ceil(density * torch.arange(1, nb + 1, dtype=torch.float64)).clamp_min(1).long()


def streaming_mask(H: int, T: int, block_size: int, sink_blocks: int, window_blocks: int) -> torch.Tensor:
    """A-shape (StreamingLLM, Xiao et al. 2023; MInference's A-shape): the first ``sink_blocks`` key
    blocks (attention sinks) plus the last ``window_blocks`` blocks up to the diagonal."""
    nb = n_blocks(T, block_size)
    i, j = torch.arange(nb).view(-1, 1), torch.arange(nb).view(1, -1)
    m = ((j < sink_blocks) | (i - j < window_blocks)) & (j <= i)
    return m.expand(H, nb, nb).clone()


def block_topk_mask(
    q: torch.Tensor, k: torch.Tensor, block_size: int, keep: float, scale: float, sink_blocks: int = 0
) -> torch.Tensor:
    """MInference block-sparse (Jiang et al. 2024): score blocks by mean-pooled q . mean-pooled k and
    keep the top ``ceil(keep * (i + 1))`` key blocks for query block ``i``; the first ``sink_blocks``
    key blocks (attention sinks) rank right after the diagonal, inside the same count."""
    qp, kp = _pool(q, block_size), _pool(_expand(k, q.shape[0]), block_size)  # (H, nb, D)
    scores = qp @ kp.transpose(-1, -2) * scale  # (H, nb, nb)
    if sink_blocks:
        scores[..., :sink_blocks] = torch.finfo(scores.dtype).max
    return keep_topk(scores, row_cap(scores.shape[-1], keep))


def _last_queries_probs(q: torch.Tensor, k: torch.Tensor, n_last: int, scale: float) -> torch.Tensor:
    """Softmax attention of the last ``n_last`` queries over all keys, causal: (H, n_last, T)."""
    H, T, _ = q.shape
    n_last = min(n_last, T)
    s = q[:, T - n_last :] @ _expand(k, H).transpose(-1, -2) * scale  # (H, L, T)
    qpos = torch.arange(T - n_last, T).view(-1, 1)
    s = s.masked_fill(torch.arange(T).view(1, -1) > qpos, float("-inf"))
    return torch.softmax(s, dim=-1)


def vertical_slash_parts(probs: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the last queries' attention (H, L, T): key-column mass pooled per key block ``vert`` (H, nb)
    and diagonal mass (offset q - k) pooled per block diagonal ``slash`` (H, nb)."""
    H, L, T = probs.shape
    nb = n_blocks(T, block_size)
    pad = nb * block_size - T
    vert = F.pad(probs.sum(1), (0, pad)).view(H, nb, block_size).sum(-1)  # (H, nb)
    qpos = torch.arange(T - L, T).view(-1, 1)
    offset = (qpos - torch.arange(T).view(1, -1)).clamp_min(0)  # (L, T)
    diag = torch.zeros(H, T).scatter_add_(1, offset.reshape(1, -1).expand(H, -1), probs.reshape(H, -1))
    sl = F.pad(diag, (0, pad)).view(H, nb, block_size).sum(-1)  # (H, nb) by offset // bs
    # a diagonal at offset o crosses block diagonals floor(o / bs) and floor(o / bs) + 1
    return vert, sl + F.pad(sl, (1, 0))[:, :nb]


def _diag_index(nb: int) -> torch.Tensor:
    return (torch.arange(nb).view(-1, 1) - torch.arange(nb).view(1, -1)).clamp_min(0)  # (nb, nb): i - j


def vertical_slash_mask(
    q: torch.Tensor, k: torch.Tensor, block_size: int, last_q: int, vertical: float, slash: float, scale: float
) -> torch.Tensor:
    """MInference vertical-slash (Jiang et al. 2024): estimate column ("vertical") and diagonal ("slash")
    importance from the last ``last_q`` queries' attention, keep the top ``vertical`` fraction of key
    block columns and ``slash`` fraction of block diagonals (sink column and local diagonal always)."""
    probs = _last_queries_probs(q, k, last_q, scale)  # (H, L, T)
    vert, sl = vertical_slash_parts(probs, block_size)  # (H, nb) each
    H, nb = vert.shape
    vert[:, 0] = float("inf")  # attention sink
    sl[:, 0] = float("inf")  # local diagonal
    n_v, n_s = max(1, math.ceil(vertical * nb)), max(1, math.ceil(slash * nb))
    cols = torch.zeros(H, nb, dtype=torch.bool).scatter_(1, vert.topk(n_v, -1).indices, True)
    diags = torch.zeros(H, nb, dtype=torch.bool).scatter_(1, sl.topk(n_s, -1).indices, True)
    return (cols.unsqueeze(1) | diags[:, _diag_index(nb)]) & causal_blocks(nb)


def _js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def flexprefill_mask(
    q: torch.Tensor, k: torch.Tensor, block_size: int, gamma: float, tau: float, max_density: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill (Lai et al. 2025): per head, compare the last query block's true block distribution
    with the mean-pooled estimate; if sqrt(JS) < ``tau`` use query-aware pooled block scores, else
    vertical-slash scores; keep per query block the fewest blocks reaching cumulative mass ``gamma``.
    Returns the mask and which heads chose query-aware (H,)."""
    H, T, _ = q.shape
    nb = n_blocks(T, block_size)
    kx = _expand(k, H)
    probs = _last_queries_probs(q, k, block_size, scale)  # (H, bs, T)
    true = F.pad(probs.mean(1), (0, nb * block_size - T)).view(H, nb, block_size).sum(-1)  # (H, nb)
    qp, kp = _pool(q, block_size), _pool(kx, block_size)  # (H, nb, D)
    pooled = qp @ kp.transpose(-1, -2) * scale  # (H, nb, nb)
    est = torch.softmax(pooled[:, -1], dim=-1)  # the last query block sees every key block
    query_aware = _js_divergence(true, est).clamp_min(0).sqrt() < tau  # (H,)
    qa_scores = torch.softmax(pooled.masked_fill(~causal_blocks(nb), float("-inf")), dim=-1)
    vert, sl = vertical_slash_parts(probs, block_size)
    vs_scores = vert.unsqueeze(1) + sl[:, _diag_index(nb)]  # (H, nb, nb)
    scores = torch.where(query_aware.view(H, 1, 1), qa_scores, vs_scores)
    return keep_cumulative(scores, gamma, row_cap(nb, max_density)), query_aware


def xattention_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float) -> torch.Tensor:
    """XAttention antidiagonal scoring: the sum of every ``stride``-th antidiagonal of each
    stride x stride tile (strided q rows reversed against strided k rows), softmaxed causally,
    summed per block: (H, nb, nb)."""
    H, T, D = q.shape
    nb = n_blocks(T, block_size)
    n = nb * block_size
    qx = F.pad(q, (0, 0, 0, n - T))
    kx = F.pad(_expand(k, H), (0, 0, 0, n - T))
    qr = torch.cat([qx[:, stride - 1 - s :: stride] for s in range(stride)], dim=-1)  # (H, n/S, S*D)
    kr = torch.cat([kx[:, s::stride] for s in range(stride)], dim=-1)  # (H, n/S, S*D)
    s = qr @ kr.transpose(-1, -2) * (scale / stride)  # (H, n/S, n/S)
    m = n // stride
    valid = torch.arange(m) * stride < T
    s = s.masked_fill(~torch.ones(m, m, dtype=torch.bool).tril() | ~valid.view(1, -1), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    r = block_size // stride
    return p.view(H, nb, r, nb, r).sum((2, 4))  # (H, nb, nb)


def xattention_mask(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, threshold: float, max_density: float, scale: float
) -> torch.Tensor:
    """XAttention (Xu et al. 2025): score blocks by strided antidiagonal sums and keep, per query block,
    blocks in score order until their share reaches ``threshold`` (first block and diagonal kept)."""
    scores = xattention_scores(q, k, block_size, stride, scale)
    return keep_cumulative(scores, threshold, row_cap(scores.shape[-1], max_density), sink=True)
