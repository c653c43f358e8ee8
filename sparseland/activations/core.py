"""Pure tensor functions of activation sparsity: thresholds, masks and the sparse linear products.

No hooks and no model here; ``sites.py`` applies these to modules and ``methods.py`` calibrates them.
The keep rule everywhere is ``|v| > threshold`` (a threshold of 0 drops only exact zeros), with a
scalar threshold (one per tensor, TEAL/CATS) or one per channel (CHESS, WINA in threshold mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantile_threshold(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The scalar ``t`` such that a fraction ``sparsity`` of ``values`` is ``<= t`` (0 when sparsity is 0).

    ``values`` holds non-negative magnitudes of any shape; the result is a 0-d float32 tensor.
    """
    flat = values.reshape(-1).float()  # (n,)
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return torch.zeros(())
    return flat.kthvalue(min(k, flat.numel())).values.clone()


def scaled_thresholds(values: torch.Tensor, scale: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-channel thresholds from one threshold on the score ``|v| * scale``.

    ``values`` (n, C) magnitudes, ``scale`` (C,) >= 0. Keeping ``|v_c| * scale_c > tau`` is the same as
    keeping ``|v_c| > tau / scale_c``; returns those (C,) thresholds (``inf`` where ``scale_c`` is 0).
    """
    tau = quantile_threshold(values * scale, sparsity)  # ()
    with torch.no_grad():
        out = tau / scale.float()  # (C,)
    return torch.where(scale > 0, out, torch.full_like(out, float("inf"))) if tau > 0 else torch.zeros_like(out)


def threshold_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask ``|x| > threshold``; ``threshold`` is () or (C,) broadcast over x's last dim."""
    return x.abs() > threshold.to(x.dtype)


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` largest ``scores`` along the last dim (per token), (..., C)."""
    c = scores.shape[-1]
    if keep >= c:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    idx = scores.topk(keep, dim=-1).indices  # (..., keep)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def keep_count(channels: int, sparsity: float) -> int:
    """How many of ``channels`` entries a per-token top-k keeps at ``sparsity``."""
    return channels - int(round(sparsity * channels))


def wina_scores(x: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """WINA's score ``|x_i| * ||W[:, i]||_2``: x (..., C), col_norms (C,) -> (..., C)."""
    return x.abs() * col_norms.to(x.dtype)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W[:, i]||_2`` of a Linear weight (out, in) -> (in,), float32."""
    return weight.detach().float().norm(dim=0)


def lowrank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation ``W ~= A @ B`` by SVD: A (out, r), B (r, in), float32."""
    w = weight.detach().float()  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``W (x * keep) + b``: the product a sparse kernel computes, x (..., in) -> (..., out)."""
    return F.linear(x * keep.to(x.dtype), weight, bias)


def rsparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """R-Sparse: ``W (x*m) + A B (x*(1-m)) + bias``; kept channels exact, dropped ones through rank r.

    x (..., in), keep (..., in) bool, a (out, r), b (r, in) -> (..., out).
    """
    m = keep.to(x.dtype)
    rest = x * (1 - m)  # (..., in) the dropped part
    return F.linear(x * m, weight, bias) + F.linear(F.linear(rest, b.to(x.dtype)), a.to(x.dtype))
