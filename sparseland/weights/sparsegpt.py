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
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, group_params, quantize_codes
from sparseland.weights.masks import check_nm_shape


def _hinv_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * I)^-1, damp = percdamp * mean(diag(H)). Step 1 of the paper."""
    return _hinv_upper_(H.clone(), percdamp)


def _hinv_upper_(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``_hinv_upper`` that overwrites ``H`` (the caller's copy): the inverse is written into H's memory
    and the factor into the Cholesky factor's, so at most two (in, in) matrices are alive, not five."""
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
    torch.cholesky_inverse(L, out=H)  # H := (H + damp)^-1
    return torch.linalg.cholesky(H, upper=True, out=L)


class _JointQuant:
    """The quantized weight being built by a joint prune + quantize run: codes, per-group scales and
    offsets, the pruned entries, and the grid (``gd``, ``gm``) of the group the loop is in."""

    def __init__(self, quant: QuantScheme, out_f: int, in_f: int):
        self.quant = quant
        self.g = g = quant.group_size(in_f)
        self.scale = torch.zeros(out_f, in_f // g, dtype=torch.float16)
        self.offset = None if quant.symmetric else torch.zeros(out_f, in_f // g, dtype=torch.float16)
        self.codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
        self.pruned = torch.zeros(out_f, in_f, dtype=torch.bool)
        self.gd = self.gm = None

    def start_group(self, W1, d, mask1, i: int, i1: int, count: int, n: int, m: int) -> None:
        """The grid of the group starting at block column ``i`` from its current weights over its kept
        entries. N:M masks are still chosen lazily, M columns at a time, as without quantization
        (choosing them all now, from not yet compensated weights, measured 1.2-1.9x the output error);
        the grid uses the kept entries they would get if chosen now."""
        quant = self.quant
        e = min(i + self.g, count)
        kept = ~mask1[:, i:e]
        for c0 in range(i, e, m) if n else ():
            sal = W1[:, c0 : c0 + m] ** 2 / d[c0 : c0 + m].reshape(1, -1) ** 2
            drop = torch.topk(sal, m - n, dim=1, largest=False).indices
            kept.scatter_(1, c0 - i + drop, False)
        ds, ms = group_params(W1[:, i:e], quant, kept)
        self.scale[:, (i1 + i) // self.g] = ds
        if self.offset is not None:
            self.offset[:, (i1 + i) // self.g] = ms
        self.gd = ds.float()
        self.gm = self.gd * -float(1 << (quant.bits - 1)) if ms is None else ms.float()

    def quantize_column(self, w: torch.Tensor, pruned: torch.Tensor, col: int) -> torch.Tensor:
        """Column ``col``'s kept weights on their group's grid; pruned ones are 0 (code 0)."""
        c = quantize_codes(w.unsqueeze(1), self.gd, self.gm, self.quant).squeeze(1)
        c = torch.where(pruned, torch.zeros_like(c), c)
        self.codes[:, col] = c
        return torch.where(pruned, torch.zeros_like(w), self.gd * c.float() + self.gm)

    def result(self) -> QuantizedWeight:
        return QuantizedWeight(self.quant, self.codes, self.scale, self.offset, ~self.pruned)


def _check_args(W, H, n: int, m: int, blocksize: int, name: str, quant: QuantScheme | None) -> None:
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise SparselandError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f}) for {name}")
    if n:
        check_nm_shape(in_f, m, name)
        if blocksize % m:
            raise SparselandError(f"blocksize={blocksize} must be a multiple of M={m}")
    if quant is not None:
        g = quant.group_size(in_f)
        if blocksize % g and in_f > blocksize:
            raise SparselandError(
                f"{name}: joint prune + {quant.name} needs the group size {g} to divide blocksize={blocksize} "
                "(a group's kept entries must be known when the loop reaches it); use a smaller group or a "
                "larger blocksize"
            )
        if n and g % m:
            raise SparselandError(f"{name}: joint {n}:{m} + {quant.name} needs M={m} to divide the group size {g}")


def _unstructured_block_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Step 2: adaptive mask for the whole block, lowest w^2 / d^2 over (out, B) entries (True = pruned)."""
    sal = (W1**2 / d.reshape(1, -1) ** 2).flatten()
    k = int(sal.numel() * sparsity)
    mask1 = torch.zeros(sal.numel(), dtype=torch.bool)  # True = pruned
    if k:
        mask1[torch.sort(sal, stable=True).indices[:k]] = True
    return mask1.reshape(W1.shape)


def _prune_block(W1, Hinv1, i1: int, sparsity: float, n: int, m: int, jq: _JointQuant | None):
    """Prune (and quantize) the columns of one block in order, compensating the later columns of the
    block after each; returns ``(Q1, Err1, mask1)``: the block's new weights, scaled errors and mask."""
    count = W1.shape[1]
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d = torch.diag(Hinv1)  # (B,)
    mask1 = _unstructured_block_mask(W1, d, sparsity) if n == 0 else torch.zeros_like(W1, dtype=torch.bool)
    for i in range(count):
        w = W1[:, i]
        if jq is not None and (i1 + i) % jq.g == 0:
            jq.start_group(W1, d, mask1, i, i1, count, n, m)
        if n and i % m == 0:
            # N:M: in this group of M columns prune the M - N least salient weights of each row.
            sal = W1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2  # (out, M)
            drop = torch.topk(sal, m - n, dim=1, largest=False).indices
            mask1.scatter_(1, i + drop, True)
        if jq is None:
            q = w.clone()
            q[mask1[:, i]] = 0
        else:
            q = jq.quantize_column(w, mask1[:, i], i1 + i)
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]  # (out,)
        # Step 3: compensate the columns of this block after column i.
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1, mask1


@torch.no_grad()
def _sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    blocksize: int,
    percdamp: float,
    name: str,
    quant: QuantScheme | None,
) -> tuple[torch.Tensor, QuantizedWeight | None]:
    """The SparseGPT loop: the pruned (and, with ``quant``, quantized) weight, and the QuantizedWeight."""
    _check_args(W, H, n, m, blocksize, name, quant)
    out_f, in_f = W.shape
    jq = _JointQuant(quant, out_f, in_f) if quant is not None else None
    W = W.detach().clone().float()
    H = H.detach().to(torch.float32, copy=True)  # one copy (a clone of a float64 Gram, then .float(), made two)
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _hinv_upper_(H, percdamp)  # (in, in) upper triangular; H's memory now holds scratch
    del H

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Q1, Err1, mask1 = _prune_block(W1, Hinv[i1:i2, i1:i2], i1, sparsity, n, m, jq)
        W[:, i1:i2] = Q1
        if jq is not None:
            jq.pruned[:, i1:i2] = mask1
        # Lazy batch update of the columns after this block.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if jq is None:
        return W, None
    return W + 0.0, jq.result()


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
    quant: QuantScheme | str | None = None,
) -> torch.Tensor:
    """Pruned (and compensated) copy of ``W`` (out, in) given ``H`` (in, in) = sum of x x^T.

    Unstructured when ``n == 0``: in each block of ``blocksize`` columns, the ``sparsity`` fraction of
    entries with the lowest saliency are dropped (chosen jointly over the block's rows and columns).
    N:M when ``n > 0``: every M consecutive columns keep the N most salient weights of each row.
    With ``quant`` (a scheme), the kept weights are also quantized inside the loop (the paper's joint
    sparsification + quantization) and the dequantized weight is returned; see ``sparsegpt_prune_quantize``.
    """
    quant = None if quant is None else QuantScheme.parse(quant)
    return _sparsegpt(W, H, sparsity, n, m, blocksize, percdamp, name, quant)[0]


def sparsegpt_prune_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    scheme: QuantScheme | str,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
) -> QuantizedWeight:
    """Joint SparseGPT pruning + quantization of ``W`` (out, in): the mask (same rules as ``sparsegpt_prune``)
    and the codes. In the OBS loop each kept weight of column i is rounded to its group's grid (chosen when
    the loop reaches the group's first column, from the current weights of the group's kept entries) and
    its quantization error is compensated like a pruning error. The group size must divide ``blocksize``."""
    return _sparsegpt(W, H, sparsity, n, m, blocksize, percdamp, name, QuantScheme.parse(scheme))[1]
