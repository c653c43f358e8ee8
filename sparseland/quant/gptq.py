"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023).

Rule: walk the columns of W in order; quantize column j to its group's grid and spread the error
err = (w_j - q_j) / [H^-1]_jj over the later columns by ``W[:, j:] -= err * U[j, j:]`` (U: the upper
Cholesky factor of H^-1; lazy batch updates per block of columns). Each group's scale and offset are
``group_params`` of the group's *current* (already compensated) weights when the loop reaches its first column.
"""

from __future__ import annotations

import torch

from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, group_params, quantize_codes
from sparseland.weights.sparsegpt import _hinv_upper


def _grid(d16: torch.Tensor, m16: torch.Tensor | None, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(out,) float32 scale and offset of a group, computed exactly as ``dequantize`` computes them."""
    d = d16.float()
    m = d * -float(1 << (scheme.bits - 1)) if m16 is None else m16.float()
    return d, m


def _current_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int, end: int
) -> torch.Tensor:
    """Current values of the columns ``i1 + i .. end`` while the loop is at column ``i`` of the block starting
    at ``i1``: the block's part from ``W1``; the part after the block gets the block's pending lazy update."""
    i2 = i1 + W1.shape[1]
    inside = W1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    after = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
    return torch.cat([inside, after], dim=1)


def _check_args(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor | None, blocksize: int) -> None:
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise SparselandError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
    if mask is not None and tuple(mask.shape) != (out_f, in_f):
        raise SparselandError(f"mask has shape {tuple(mask.shape)}, expected ({out_f}, {in_f})")
    if blocksize < 1:
        raise SparselandError(f"blocksize={blocksize} must be positive")


def _static_grids(W, keep, scheme: QuantScheme, g: int, scale: torch.Tensor, offset: torch.Tensor | None) -> list:
    """Act-order's "static groups": groups stay contiguous in the original column order (the storage
    format), so their grids are fixed up front from the unquantized weights, as round-to-nearest would
    choose them; fills ``scale``/``offset`` and returns each group's float32 ``(d, m)``."""
    for k in range(scale.shape[1]):
        sl = slice(k * g, (k + 1) * g)
        d16, m16 = group_params(W[:, sl], scheme, None if keep is None else keep[:, sl])
        scale[:, k] = d16
        if offset is not None:
            offset[:, k] = m16
    return [_grid(scale[:, k], None if offset is None else offset[:, k], scheme) for k in range(scale.shape[1])]


def _quantize_column(w, d, m, scheme: QuantScheme, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` of column ``w`` on the grid ``(d, m)``; pruned entries: code 0, value 0."""
    c = quantize_codes(w.unsqueeze(1), d, m, scheme).squeeze(1)
    q = d * c.float() + m
    if keep is not None:
        c = torch.where(keep, c, torch.zeros_like(c))
        q = torch.where(keep, q, torch.zeros_like(q))
    return c, q


@torch.no_grad()
def _gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme | str,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """``gptq_quantize`` that also returns the final float32 weight the loop produced (for checks)."""
    scheme = QuantScheme.parse(scheme)
    _check_args(W, H, mask, blocksize)
    out_f, in_f = W.shape
    g = scheme.group_size(in_f)
    G = in_f // g
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    keep = None if mask is None else mask.detach().bool().clone()

    # Step 0: inputs that were always zero do not matter; give them a unit Hessian entry.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(out_f, G, dtype=torch.float16)
    offset = None if scheme.symmetric else torch.zeros(out_f, G, dtype=torch.float16)
    perm = torch.arange(in_f)
    static = None
    if act_order:
        # Act-order (Section 4, "static groups" variant): columns in decreasing order of [H]_jj.
        static = _static_grids(W, keep, scheme, g, scale, offset)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]

    # Step 1: upper Cholesky factor of the damped inverse Hessian.
    Hinv = _hinv_upper(H, percdamp)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    d = m = None
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            if static is not None:
                d, m = static[int(perm[j]) // g]
            elif j % g == 0:
                # Step 2: the group's grid from its current (compensated) weights, kept entries only.
                cur = _current_columns(W, W1, Err1, Hinv, i1, i, j + g)
                d16, m16 = group_params(cur, scheme, None if keep is None else keep[:, j : j + g])
                scale[:, j // g] = d16
                if offset is not None:
                    offset[:, j // g] = m16
                d, m = _grid(d16, m16, scheme)
            # Step 3: quantize column j (pruned entries: code 0, value 0).
            w = W1[:, i]
            c, q = _quantize_column(w, d, m, scheme, None if keep is None else keep[:, j])
            codes[:, j] = c
            Q1[:, i] = q
            # Step 4: spread the error over the block's later columns.
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        # Step 5: lazy batch update of the columns after this block.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm)
        W, codes = W[:, inv], codes[:, inv].contiguous()
    qw = QuantizedWeight(scheme, codes, scale, offset, None if mask is None else mask.detach().bool().clone())
    return qw, W + 0.0


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme | str,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ-quantized ``W`` (out, in) given ``H`` (in, in) = sum of x x^T over the calibration inputs.

    ``mask`` (out, in) bool (False = pruned) keeps a sparse weight sparse: pruned entries are set to 0
    at their column (their residual is compensated like a quantization error), end exactly 0 with code 0,
    and take no part in their group's scale. ``act_order`` processes columns by decreasing [H]_jj with
    group grids fixed up front (GPTQ's "static groups"). ``dequantize()`` of the result is the final weight.
    """
    return _gptq(W, H, scheme, blocksize, percdamp, act_order, mask)[0]
