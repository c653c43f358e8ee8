"""The MoE MLP decode kernel (``csrc/moe.cpp``) and its PyTorch reference.

``moe_mlp(x, w_gate, w_up, w_down_t, segs)``: x (1, H) float32; w_gate, w_up (I, H); w_down_t (I, H)
(the down projection transposed, so a neuron is one row); segs (S, 2) int64 ``[start, end)`` runs of
active neurons, ascending and disjoint. Returns (1, H) = sum over active neurons j of
``silu(w_gate[j] . x) * (w_up[j] . x) * w_down_t[j]``. Only the active rows of the three matrices are
read: after MoE-fication every expert is one contiguous run, so skipped experts are skipped reads.
"""

from __future__ import annotations

import torch

from sparseland.runtime.kernels import use_kernels


def segments(mlp, sel: torch.Tensor) -> torch.Tensor:
    """(S, 2) int64 runs of active neurons of ``MoEMLP`` ``mlp`` for one token's selection sel (E,);
    adjacent active experts merge into one run."""
    runs: list[list[int]] = []
    if mlp.n_shared:
        runs.append([0, mlp.n_shared])
    size = mlp.expert_size
    for e in torch.nonzero(sel).flatten().tolist():
        s = mlp.n_shared + e * size
        if runs and runs[-1][1] == s:
            runs[-1][1] = s + size
        else:
            runs.append([s, s + size])
    return torch.tensor(runs, dtype=torch.long).reshape(-1, 2)


def moe_mlp_reference(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, segs: torch.Tensor
) -> torch.Tensor:
    if segs.numel() == 0:
        return x.new_zeros(x.shape[0], w_gate.shape[1])
    idx = torch.cat([torch.arange(int(a), int(b)) for a, b in segs.tolist()])  # (R,)
    xf = x.float()
    h = torch.nn.functional.silu(xf @ w_gate[idx].float().T) * (xf @ w_up[idx].float().T)  # (1, R)
    return h @ w_down_t[idx].float()  # (1, H)


def moe_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, segs: torch.Tensor
) -> torch.Tensor:
    """The C++ kernel when available (float32 weights), else the reference."""
    if use_kernels() and w_gate.dtype == torch.float32 and hasattr(torch.ops.sparseland, "moe_mlp"):
        return torch.ops.sparseland.moe_mlp(x.contiguous(), w_gate, w_up, w_down_t, segs.contiguous())
    return moe_mlp_reference(x, w_gate, w_up, w_down_t, segs)
