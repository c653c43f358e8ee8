"""Pure tensor-in / tensor-out scores and masks. A mask is a bool tensor shaped like ``W``: True = kept.

The comparison group of an unstructured mask is one output row (the Wanda paper's finding: comparing
within a row beats comparing across the layer for LLMs); an N:M mask compares within each group of M
consecutive input weights of a row and keeps N.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W| (Han et al. 2015)."""
    return W.abs().float()


def wanda_scores(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``; ``W`` (out, in), ``x_norm`` (in,) channel norms."""
    if x_norm.shape != (W.shape[1],):
        raise SparselandError(f"x_norm has shape {tuple(x_norm.shape)}, expected ({W.shape[1]},)")
    return W.abs().float() * x_norm.float().reshape(1, -1)


def random_scores(W: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded uniform random scores (Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning")."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(W.shape, generator=gen)


def n_pruned(in_features: int, sparsity: float) -> int:
    """How many weights of a row of ``in_features`` an unstructured mask drops (floor, as Wanda)."""
    return int(in_features * sparsity)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping the ``floor(in * sparsity)`` lowest scores of each row (ties: lower index first)."""
    out_f, in_f = scores.shape
    k = n_pruned(in_f, sparsity)
    mask = torch.ones(out_f, in_f, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # (out, k) lowest scores
        mask.scatter_(1, idx, False)
    return mask


def check_nm_shape(in_features: int, m: int, name: str = "layer") -> None:
    if in_features % m:
        raise SparselandError(
            f"{name} has {in_features} input features, not divisible by M={m}; pick an M that divides "
            f"{in_features} or leave this layer out with filter_fn"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "layer") -> torch.Tensor:
    """Keep mask with the ``n`` highest scores of every group of ``m`` consecutive inputs of a row."""
    if not 0 < n < m:
        raise SparselandError(f"N:M needs 0 < N < M, got {n}:{m}")
    out_f, in_f = scores.shape
    check_nm_shape(in_f, m, name)
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.topk(groups, n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def make_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, name: str = "layer") -> torch.Tensor:
    """N:M mask if ``nm`` is given, else a per-row unstructured mask at ``sparsity``."""
    if nm is not None:
        return nm_mask(scores, nm[0], nm[1], name)
    return unstructured_mask(scores, sparsity)


def is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of each row has at most ``n`` nonzeros."""
    out_f, in_f = W.shape
    if in_f % m:
        return False
    return bool(((W.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())
