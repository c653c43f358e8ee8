"""Decode selections: pure functions choosing which cached keys a new token attends.

Batch size 1. ``q`` (H, D) is the new token's queries, caches are (KVH, S, D) before the grouped-query
repeat (head ``h`` reads KV head ``h // (H // KVH)``); selections are int64 positions (H, K), or
(KVH, K) for the KV-cache evictions (SnapKV, H2O), which choose per KV head what a physical cache keeps.
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


def quest_pages(keep: float, S: int, page_size: int) -> int:
    """Quest's page budget at ``S`` cached keys: ceil(keep * S / page_size), at most the S // page_size
    full pages (the partial last page is attended besides)."""
    return min(math.ceil(keep * S / page_size - 1e-9), S // page_size)


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


def quest_refine_select(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    S: int,
    page_size: int,
    n_pages: int,
    refine: float,
) -> torch.Tensor:
    """Quest with a token-level second stage: the ``ceil(refine * n_pages)`` pages with the largest
    upper bound are candidates; of their keys, the ``n_pages * page_size`` with the largest exact
    q . k are kept, plus the partial last page: (H, n_pages * page_size + S % page_size), sorted.
    The same number of keys as ``quest_select``, drawn from ``refine`` times as many pages."""
    H, Dh = q.shape
    P = kmin.shape[1]
    n_pages = min(n_pages, P)
    n_cand = min(P, math.ceil(refine * n_pages - 1e-9))
    top = quest_upper_bound(q, kmin, kmax).topk(n_cand, dim=-1).indices  # (H, c)
    cand = (top.unsqueeze(-1) * page_size + torch.arange(page_size)).reshape(H, -1)  # (H, c * page)
    kvh = k_cache.shape[0]
    # exact scores of each head's candidates, gathered from its KV head: (KVH, G * c * page, D)
    keys = k_cache.gather(1, cand.view(kvh, -1, 1).expand(-1, -1, Dh)).view(H, -1, Dh)
    s = (keys @ q.unsqueeze(-1)).squeeze(-1)  # (H, c * page)
    best = cand.gather(1, s.topk(n_pages * page_size, dim=-1).indices).sort(-1).values
    tail = torch.arange(P * page_size, S).expand(H, -1)
    return torch.cat([best, tail], dim=-1)


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


def group_scores(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum the scores of the G = H // KVH query heads that read each KV head: (H, S) -> (KVH, S).

    A physical KV cache holds KV heads, so eviction ranks positions per KV head on the group's summed
    scores (the GQA rule of KVPress / AdaKV)."""
    H, S = scores.shape
    return scores.view(n_kv, H // n_kv, S).sum(1)


def snapkv_votes(q_obs: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """SnapKV's votes: the softmax attention of the observation window's queries ``q_obs`` (H, w, D)
    (causal within the window) summed over the window, for the prompt positions before it: (H, S - w)."""
    H, w, _ = q_obs.shape
    S = k.shape[1]
    prefix = S - w
    s = q_obs @ _expand(k, H).transpose(-1, -2) * scale  # (H, w, S)
    causal = torch.arange(S).view(1, -1) > torch.arange(prefix, S).view(-1, 1)
    return torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1)[:, :, :prefix].sum(1)  # (H, prefix)


def _pool(votes: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's clustering: max-pool each row of votes (R, P) over a centred window of ``kernel``."""
    return F.max_pool1d(votes.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)


def snapkv_keep(votes: torch.Tensor, w: int, n_keep: int, kernel: int) -> torch.Tensor:
    """SnapKV's cache from votes (R, S - w) of any rows (query or KV heads): max-pool the votes over
    ``kernel``, keep the top ``n_keep - w`` plus the window: (R, min(max(n_keep, w), S)) sorted positions."""
    R, prefix = votes.shape
    S = prefix + w
    n_top = min(max(n_keep - w, 0), prefix)
    window = torch.arange(prefix, S).expand(R, -1)
    if n_top == 0:
        return window.clone()
    top = _pool(votes, kernel).topk(n_top, dim=-1).indices
    return torch.cat([top, window], dim=-1).sort(-1).values


def group_union_top(scores: torch.Tensor, n_kv: int, k: int) -> torch.Tensor:
    """Per KV head, the union of its G query heads' rankings taken rank by rank (each head's best, then
    each head's second best, ...) until ``k`` distinct positions: scores (H, S) -> (KVH, k) sorted.
    Every head of the group gets an equal share of the top ranks, where summing lets the heads with
    the most peaked attention take them all."""
    H = scores.shape[0]
    G = H // n_kv
    return torch.stack([shared_top_tokens(scores[g * G : (g + 1) * G], k)[0] for g in range(n_kv)])


def snapkv_select(
    q_obs: torch.Tensor, k: torch.Tensor, n_keep: int, kernel: int, scale: float, group: str = "sum"
) -> torch.Tensor:
    """SnapKV (Li et al. 2024): the observation window's queries ``q_obs`` (H, w, D) vote for prompt
    positions before the window (summed softmax attention, max-pooled over ``kernel``); keep the top
    ``n_keep - w`` of those plus the window itself. Selection is per KV head: ``group="sum"`` sums the
    group's votes before pooling (KVPress / AdaKV), ``"union"`` merges the query heads' own rankings
    (``group_union_top``): k (KVH, S, D) -> (KVH, min(max(n_keep, w), S)) sorted positions; or, with
    ``group="query"``, per query head as in the paper's code: (H, ...) rows, G times the cache."""
    KVH, S, _ = k.shape
    w = q_obs.shape[1]
    rows = q_obs.shape[0] if group == "query" else KVH
    n_top = min(max(n_keep - w, 0), S - w)
    if n_top == 0:  # the window only: no votes needed
        return torch.arange(S - w, S).expand(rows, -1).clone()
    votes = snapkv_votes(q_obs, k, scale)  # (H, S - w)
    if group == "query":
        return snapkv_keep(votes, w, n_keep, kernel)
    if group == "sum":
        return snapkv_keep(group_scores(votes, KVH), w, n_keep, kernel)
    top = group_union_top(_pool(votes, kernel), KVH, n_top)  # (KVH, n_top)
    return torch.cat([top, torch.arange(S - w, S).expand(KVH, -1)], dim=-1).sort(-1).values


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """H2O (Zhang et al. 2023) heavy-hitter scores after prefill: each key's attention summed over all
    (causal) queries, computed in query chunks: q (H, T, D), k (KVH, T, D) -> (H, T)."""
    H, T, _ = q.shape
    kx = _expand(k, H)
    acc = torch.zeros(H, T)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)  # the chunk's queries see keys < t1 only
        s = q[:, t0:t1] @ kx[:, :t1].transpose(-1, -2) * scale  # (H, c, t1)
        s = s.masked_fill(torch.arange(t1).view(1, -1) > torch.arange(t0, t1).view(-1, 1), float("-inf"))
        acc[:, :t1] += torch.softmax(s, dim=-1).sum(1)
    return acc


def h2o_keep(scores: torch.Tensor, n_keep: int, n_recent: int) -> torch.Tensor:
    """The cache H2O keeps: the last ``n_recent`` positions plus the highest-scored older ones, ``n_keep``
    in all per row: scores (R, S) -> (R, min(n_keep, S)) sorted positions. Rows are KV heads when the
    scores are group-summed (``group_scores``), query heads otherwise."""
    R, S = scores.shape
    n_keep = min(n_keep, S)
    n_recent = min(n_recent, n_keep)
    older = S - n_recent
    recent = torch.arange(older, S).expand(R, -1)
    n_heavy = min(n_keep - n_recent, older)
    heavy = scores[:, :older].topk(n_heavy, dim=-1).indices
    return torch.cat([heavy, recent], dim=-1).sort(-1).values


def h2o_evict(scores: torch.Tensor, positions: torch.Tensor, recent_from: int) -> torch.Tensor:
    """H2O's eviction during decode: per row, the cache slot with the lowest accumulated score among
    the entries older than ``recent_from`` (the recent ones are protected): scores, positions (R, n)
    -> (R,) slot indices. At least one entry must be older than ``recent_from``."""
    return scores.masked_fill(positions >= recent_from, float("inf")).argmin(-1)


def swap_remove(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Remove entry ``slot[r]`` of each row by moving the row's last entry into it (O(1) per row, the
    order of the others is kept): x (R, n, ...) -> (R, n - 1, ...); returns a view of ``x``'s storage."""
    rows = torch.arange(x.shape[0])
    x[rows, slot] = x[:, -1].clone()
    return x[:, :-1]


def budget(keep: float, n: int) -> int:
    """Keys kept from ``n``: ceil(keep * n), at least one."""
    return max(1, math.ceil(keep * n - 1e-9))
