"""DSnoT (Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024).

Rule: with dW = W_dense - W_sparse, a row's expected reconstruction error is e = sum_j dW_j E[x_j]. Grow
the pruned weight that reduces e the most (same sign as e, largest |W_j E[x_j]| / Var[x_j]^p), prune the
kept weight of least Wanda importance among those whose removal also moves e toward zero; repeat for up
to ``max_cycles`` swaps per row, stopping a row when |e| <= ``update_threshold`` or e changes sign.

Each row keeps its number of nonzeros (one grown, one pruned; for N:M within the same group of M).
A swap is applied only if it lowers the row's reconstruction error on the calibration inputs,
``dW H dW^T`` with H = sum x x^T, computed exactly in float64: the refinement never raises it.
"""

from __future__ import annotations

import torch


def reconstruction_error(W_dense: torch.Tensor, W_sparse: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ||(W_dense - W_sparse) X^T||^2 = dW H dW^T for H = X^T X; shape (out,), float64."""
    D = W_dense.double() - W_sparse.double()  # (out, in)
    return ((D @ H.double()) * D).sum(1)


def _nm_prune_candidates(r, j, m: int, kept, Wc, mu, sign0, importance) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, has_k)``: for each row ``r`` growing column ``j``, the least important kept weight of j's
    group of M whose removal moves e toward zero, and whether the group has one (N:M keeps N per group)."""
    grp = (j // m).reshape(-1, 1) * m + torch.arange(m).reshape(1, -1)  # (R, M) columns of the group
    ok = kept[r.reshape(-1, 1), grp] & (torch.sign(Wc[r.reshape(-1, 1), grp] * mu[0, grp]) == -sign0[r])
    choice = torch.where(ok, importance[r.reshape(-1, 1), grp], torch.tensor(float("inf"))).argmin(1)
    return grp[torch.arange(len(r)), choice], ok.any(1)


@torch.no_grad()
def dsnot_refine(
    W_dense: torch.Tensor,
    W_sparse: torch.Tensor,
    H: torch.Tensor,
    x_mean: torch.Tensor,
    x_var: torch.Tensor,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var: float = 1.0,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Refined copy of ``W_sparse`` (its zeros are the mask) with the same number of zeros per row.

    ``W_dense`` (out, in) the weights before pruning; ``H`` (in, in) sum of x x^T over the calibration
    tokens; ``x_mean``/``x_var`` (in,) the per-channel mean and variance of the inputs.
    """
    out_f, in_f = W_dense.shape
    Wd = W_dense.detach().float()
    Wc = W_sparse.detach().clone().float()
    Hd = H.detach().double()
    mu = x_mean.detach().float().reshape(1, -1)  # (1, in)
    kept = Wc != 0  # (out, in)
    D = Wd - Wc  # (out, in) what pruning removed from each weight
    G = D.double() @ Hd  # (out, in) = dW H: half the gradient of dW H dW^T
    hdiag = torch.diag(Hd)  # (in,)
    contrib = Wd * mu  # (out, in) expected output contribution of each dense weight
    S = (D * mu).sum(1)  # (out,) expected reconstruction error of each row
    sign0 = torch.sign(S).reshape(-1, 1)
    grow_score = contrib.abs() / x_var.detach().float().clamp_min(1e-12).reshape(1, -1) ** pow_of_var
    importance = Wd.abs() * torch.sqrt(hdiag.clamp_min(0)).float().reshape(1, -1)  # Wanda score
    # Candidates are fixed by the sign of e, which a row keeps while it is refined (the reference
    # code's sorted lists): grow = pruned with W_j E[x_j] of e's sign, best first; prune = kept with
    # W_k E[x_k] of the opposite sign, least important first. Swapped weights never re-qualify.
    can_grow = ~kept & (torch.sign(contrib) == sign0) & (sign0 != 0)
    can_prune = kept & (torch.sign(Wc * mu) == -sign0)
    inf = torch.tensor(float("inf"))
    grow_order = torch.sort(torch.where(can_grow, -grow_score, inf), dim=1, stable=True).indices  # (out, in)
    prune_order = torch.sort(torch.where(can_prune, importance, inf), dim=1, stable=True).indices
    n_grow, n_prune = can_grow.sum(1), can_prune.sum(1)
    gp = torch.zeros(out_f, dtype=torch.long)  # next grow candidate of each row
    pp = torch.zeros(out_f, dtype=torch.long)  # next prune candidate of each row
    rows = torch.arange(out_f)
    active = torch.ones(out_f, dtype=torch.bool)
    for _ in range(max_cycles):
        active &= (S.abs() > update_threshold) & (torch.sign(S) == sign0[:, 0]) & (gp < n_grow)
        if nm is None:
            active &= pp < n_prune
        if not active.any():
            break
        r = rows[active]
        j = grow_order[r, gp[r]]  # Step 1 (grow)
        if nm is None:
            k = prune_order[r, pp[r]]  # Step 2 (prune)
            has_k = torch.ones_like(j, dtype=torch.bool)
        else:  # N:M: prune within j's group of M so every group keeps N
            k, has_k = _nm_prune_candidates(r, j, nm[1], kept, Wc, mu, sign0, importance)
        # Step 3: exact change of dW H dW^T for dW_j -> 0 and dW_k -> dW_k + Wc_k.
        dj = -D[r, j].double()
        dk = Wc[r, k].double()
        delta = 2 * (dj * G[r, j] + dk * G[r, k]) + dj**2 * hdiag[j] + dk**2 * hdiag[k] + 2 * dj * dk * Hd[j, k]
        accept = has_k & (delta < 0)
        gp[r] += 1  # a rejected grow candidate is not tried again
        if accept.any():
            ra, ja, ka = r[accept], j[accept], k[accept]
            if nm is None:
                pp[ra] += 1
            dja, dka = dj[accept], dk[accept]
            G[ra] += dja.reshape(-1, 1) * Hd[ja] + dka.reshape(-1, 1) * Hd[ka]
            S[ra] += (dja * mu[0, ja].double() + dka * mu[0, ka].double()).float()
            Wc[ra, ja] = Wd[ra, ja]
            Wc[ra, ka] = 0
            D[ra, ja] = 0
            D[ra, ka] = Wd[ra, ka]
            kept[ra, ja] = True
            kept[ra, ka] = False
    return Wc.to(W_sparse.dtype)
