"""Which weights each sparse fine-tuning method trains: pure tensor functions, one per paper's rule.

Every function returns sorted flat indices (int64) into one weight matrix, or column indices for the
structured method. ``allowed`` (bool, the weight's shape) restricts the choice, e.g. to the kept
weights of a pruned matrix, so an adapter never writes where the pruned model has a zero.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError


def _check_k(k: int, available: int, what: str) -> None:
    if not 0 < k <= available:
        raise SparselandError(f"{what}: cannot choose {k} of {available} weights; lower the budget")


def _topk_flat(score: torch.Tensor, k: int, allowed: torch.Tensor | None) -> torch.Tensor:
    s = score.detach().flatten().float().clone()
    if allowed is not None:
        s[~allowed.flatten()] = -float("inf")
        _check_k(k, int(allowed.sum()), "top-k")
    else:
        _check_k(k, s.numel(), "top-k")
    return torch.topk(s, k, sorted=False).indices.sort().values


def shira_indices(
    weight: torch.Tensor, k: int, how: str = "random", seed: int = 0, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """SHiRA (Bhardwaj et al. 2024): a fixed mask of ``k`` weights, chosen at random (seeded) or as the
    ``k`` largest ``|W|``; only those entries of W train, the mask never changes."""
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        score = torch.rand(weight.shape, generator=gen)
    elif how == "magnitude":
        score = weight.abs()
    else:
        raise SparselandError(f"SHiRA mask {how!r} is not 'random' or 'magnitude'")
    return _topk_flat(score, k, allowed)


def lift_indices(weight: torch.Tensor, k: int, rank: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """LIFT (Liu et al. 2025): the principal weights are the ``k`` largest entries in magnitude of the
    rank-``rank`` approximation of W (truncated SVD), not of W itself."""
    if not 0 < rank <= min(weight.shape):
        raise SparselandError(f"LIFT rank={rank} must be in [1, {min(weight.shape)}]")
    return _topk_flat(low_rank_approx(weight, rank).abs(), k, allowed)


def low_rank_approx(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``weight`` in Frobenius norm (Eckart-Young, via SVD)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def s2ft_columns(
    in_features: int,
    n_cols: int,
    group: int = 1,
    how: str = "random",
    weight: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """S2FT (Yang et al. 2024): choose whole structures -- attention heads (``group`` = head_dim input
    channels of o_proj) or MLP channels (``group`` = 1, input channels of down_proj) -- and train only
    those columns. Returns the sorted column indices (``n_cols`` rounded down to whole groups).
    ``how``: random (the paper's default) or "norm" (largest column-group L2 norm of ``weight``)."""
    if in_features % group:
        raise SparselandError(f"in_features={in_features} is not a multiple of the group size {group}")
    n_groups = in_features // group
    pick = n_cols // group
    _check_k(pick, n_groups, "S2FT")
    if how == "random":
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed))
    elif how == "norm":
        if weight is None:
            raise SparselandError("S2FT how='norm' needs the weight")
        order = weight.detach().float().pow(2).sum(0).view(n_groups, group).sum(1).argsort(descending=True)
    else:
        raise SparselandError(f"S2FT selection {how!r} is not 'random' or 'norm'")
    groups = order[:pick].sort().values
    return (groups[:, None] * group + torch.arange(group)).flatten()


def spiel_update(
    idx: torch.Tensor,
    delta: torch.Tensor,
    grad_acc: torch.Tensor,
    n_swap: int,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpIEL (Ansell et al. 2024) index update at a fixed budget: drop the ``n_swap`` trainable indices whose
    delta is smallest in magnitude, regrow the ``n_swap`` non-trainable indices with the largest accumulated
    gradient magnitude (``grad_acc``: dense, the weight's shape). Returns ``(new_idx sorted, kept)``
    where ``kept`` (bool over ``idx``) marks the surviving old indices (their deltas carry over)."""
    k = idx.numel()
    n_swap = min(n_swap, k)
    kept = torch.ones(k, dtype=torch.bool)
    if n_swap == 0:
        return idx, kept
    score = grad_acc.detach().flatten().abs().float().clone()
    score[idx] = -float("inf")  # only grow where not trainable now
    if allowed is not None:
        score[~allowed.flatten()] = -float("inf")
    n_free = int(torch.isfinite(score).sum())
    n_swap = min(n_swap, n_free)
    if n_swap == 0:
        return idx, kept
    drop = torch.topk(delta.detach().abs().float(), n_swap, largest=False, sorted=False).indices
    kept[drop] = False
    grow = torch.topk(score, n_swap, sorted=False).indices
    new = torch.cat([idx[kept], grow])
    return new.sort().values, kept
