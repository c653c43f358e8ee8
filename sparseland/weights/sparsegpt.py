"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023).

Rule: walk the columns of W in order; the weights pruned in column j leave an error err = w_j / [H^-1]_jj
that is compensated in the later columns by ``W[:, j:] -= err * H^-1[j, j:]`` (the OBS update through
the upper Cholesky factor of H^-1, H = X^T X + damping). The mask is chosen adaptively per block of
``blocksize`` columns by the OBS saliency w^2 / [H^-1]_jj^2 (for N:M: per group of M columns).
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError
from sparseland.weights.masks import check_nm_shape


def _hinv_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * I)^-1, damp = percdamp * mean(diag(H)). Step 1 of the paper."""
    H = H.clone()
    diag = torch.arange(H.shape[0])
    damp = percdamp * torch.mean(torch.diag(H))
    if not damp > 0:
        damp = torch.tensor(1.0, dtype=H.dtype)
    H[diag, diag] += damp
    for attempt in range(6):  # grow the damping if H is numerically indefinite
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H[diag, diag] += damp * (10**attempt)
    else:
        raise SparselandError("the calibration Hessian is not positive definite even with damping; use more data")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
) -> torch.Tensor:
    """Pruned (and compensated) copy of ``W`` (out, in) given ``H`` (in, in) = sum of x x^T.

    Unstructured when ``n == 0``: in each block of ``blocksize`` columns, the ``sparsity`` fraction of
    entries with the lowest saliency are dropped (chosen jointly over the block's rows and columns).
    N:M when ``n > 0``: every M consecutive columns keep the N most salient weights of each row.
    """
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise SparselandError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f}) for {name}")
    if n:
        check_nm_shape(in_f, m, name)
        if blocksize % m:
            raise SparselandError(f"blocksize={blocksize} must be a multiple of M={m}")
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _hinv_upper(H, percdamp)  # (in, in) upper triangular

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d = torch.diag(Hinv1)  # (B,)
        if n == 0:
            # Step 2: adaptive mask for the whole block, lowest w^2 / d^2 over (out, B) entries.
            sal = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            k = int(sal.numel() * sparsity)
            mask1 = torch.zeros(sal.numel(), dtype=torch.bool)  # True = pruned
            if k:
                mask1[torch.sort(sal, stable=True).indices[:k]] = True
            mask1 = mask1.reshape(out_f, count)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if n and i % m == 0:
                # N:M: in this group of M columns prune the M - N least salient weights of each row.
                sal = W1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2  # (out, M)
                drop = torch.topk(sal, m - n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]  # (out,)
            # Step 3: compensate the columns of this block after column i.
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        # Lazy batch update of the columns after this block.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W
