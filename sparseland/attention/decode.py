"""Decode selections: pure functions choosing which cached keys a new token attends.

Batch size 1. ``q`` (H, D) is the new token's queries, caches are (KVH, S, D) before the grouped-query
repeat (head ``h`` reads KV head ``h // (H // KVH)``); selections are int64 positions (H, K).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _expand(k: torch.Tensor, H: int) -> torch.Tensor:
    return k.repeat_interleave(H // k.shape[0], 0)  # (H, S, D)


def quest_page_bounds(k_cache: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of the keys in each full page: (KVH, P, D) each, P = S // page_size."""
    KVH, S, D = k_cache.shape
    P = S // page_size
    pages = k_cache[:, : P * page_size].view(KVH, P, page_size, D)
    return pages.amin(2), pages.amax(2)


def quest_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest (Tang et al. 2024): an upper bound of q . k over each page, sum_d max(q_d m_d, q_d M_d),
    from the page's element-wise min m / max M: (H, D) x (KVH, P, D) -> (H, P)."""
    H = q.shape[0]
    qx = q.unsqueeze(1)  # (H, 1, D)
    return torch.maximum(qx * _expand(kmin, H), qx * _expand(kmax, H)).sum(-1)


def quest_select(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, S: int, page_size: int, n_pages: int
) -> torch.Tensor:
    """Positions of the ``n_pages`` full pages with the largest upper bound, plus the partial last page
    (always attended): (H, n_pages * page_size + S % page_size), sorted."""
    H = q.shape[0]
    P = kmin.shape[1]
    n_pages = min(n_pages, P)
    top = quest_upper_bound(q, kmin, kmax).topk(n_pages, dim=-1).indices.sort(-1).values  # (H, n)
    tok = (top.unsqueeze(-1) * page_size + torch.arange(page_size)).reshape(H, -1)  # (H, n * page)
    tail = torch.arange(P * page_size, S).expand(H, -1)
    return torch.cat([tok, tail], dim=-1)


def full_probs(q: torch.Tensor, k_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one query per head over the whole cache: (H, S)."""
    H, D = q.shape
    kvh = k_cache.shape[0]
    s = q.view(kvh, H // kvh, D) @ k_cache.transpose(-1, -2) * scale  # (KVH, G, S)
    return torch.softmax(s, dim=-1).reshape(H, -1)


def top_tokens(probs: torch.Tensor, k: int) -> torch.Tensor:
    """TidalDecode (Yang et al. 2024) selection: the ``k`` most attended positions per head, sorted."""
    return probs.topk(min(k, probs.shape[-1]), dim=-1).indices.sort(-1).values  # (H, k)


def shared_top_tokens(probs: torch.Tensor, k: int) -> torch.Tensor:
    """One token set for all heads: the union of the heads' rankings taken rank by rank (every head's
    best, then every head's second best, ...) until ``k`` distinct positions: (H, k) sorted, rows equal.

    A variant of TidalDecode's selection for small models, where the top tokens of one head miss what
    another head needs; the budget stays ``k`` tokens per head."""
    H, S = probs.shape
    k = min(k, S)
    ranked = probs.topk(k, dim=-1).indices.t().reshape(-1)  # (k * H,) rank-major
    first = torch.full((S,), ranked.numel(), dtype=torch.long)
    first.scatter_reduce_(0, ranked, torch.arange(ranked.numel()), reduce="amin")  # earliest rank of each position
    chosen = first.argsort(stable=True)[:k]  # positions never ranked sort last; k <= #distinct always holds
    return chosen.sort().values.expand(H, -1)


def snapkv_select(q_obs: torch.Tensor, k: torch.Tensor, n_keep: int, kernel: int, scale: float) -> torch.Tensor:
    """SnapKV (Li et al. 2024): the observation window's queries ``q_obs`` (H, w, D) vote for prompt
    positions before the window (summed softmax attention, max-pooled over ``kernel``); keep the top
    ``n_keep - w`` of those plus the window itself: (H, max(n_keep, w)) sorted positions."""
    H, w, _ = q_obs.shape
    S = k.shape[1]
    prefix = S - w
    n_top = min(max(n_keep - w, 0), prefix)
    window = torch.arange(prefix, S).expand(H, -1)
    if n_top == 0:
        return window.clone()
    s = q_obs @ _expand(k, H).transpose(-1, -2) * scale  # (H, w, S)
    causal = torch.arange(S).view(1, -1) > torch.arange(prefix, S).view(-1, 1)
    votes = torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1)[:, :, :prefix].sum(1)  # (H, prefix)
    votes = F.max_pool1d(votes.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    top = votes.topk(n_top, dim=-1).indices
    return torch.cat([top, window], dim=-1).sort(-1).values


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """H2O (Zhang et al. 2023) heavy-hitter scores after prefill: each key's attention summed over all
    (causal) queries, computed in query chunks: q (H, T, D), k (KVH, T, D) -> (H, T)."""
    H, T, _ = q.shape
    kx = _expand(k, H)
    acc = torch.zeros(H, T)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = q[:, t0:t1] @ kx.transpose(-1, -2) * scale  # (H, c, T)
        s = s.masked_fill(torch.arange(T).view(1, -1) > torch.arange(t0, t1).view(-1, 1), float("-inf"))
        acc += torch.softmax(s, dim=-1).sum(1)
    return acc


def h2o_keep(scores: torch.Tensor, n_keep: int, n_recent: int) -> torch.Tensor:
    """The cache H2O keeps: the last ``n_recent`` positions plus the highest-scored older ones, ``n_keep``
    in all per head: scores (H, S) -> (H, min(n_keep, S)) sorted positions."""
    H, S = scores.shape
    n_keep = min(n_keep, S)
    n_recent = min(n_recent, n_keep)
    older = S - n_recent
    recent = torch.arange(older, S).expand(H, -1)
    n_heavy = min(n_keep - n_recent, older)
    heavy = scores[:, :older].topk(n_heavy, dim=-1).indices
    return torch.cat([heavy, recent], dim=-1).sort(-1).values


def budget(keep: float, n: int) -> int:
    """Keys kept from ``n``: ceil(keep * n), at least one."""
    return max(1, math.ceil(keep * n - 1e-9))
