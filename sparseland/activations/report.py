"""What activation sparsity buys: the fraction of decoder weight reads a sparse kernel can skip.

Methods sparsify different tensors (TEAL all seven projection inputs, CATS only the MLP gate
activation, R-Sparse adds low-rank work), so equal nominal "sparsity" is not equal savings. This
counts, from *measured* per-site sparsity, the weights a decode step need not read:

- input site on Linear W (out, in) at sparsity s: ``s * out * in`` (minus ``r * (out + in)`` for an
  R-Sparse rank-r correction, which must be read);
- gate_act site at sparsity s: ``s * (numel(up) + numel(down))`` -- the gate itself is computed densely.
"""

from __future__ import annotations

import torch

from sparseland.activations.calibrate import linear_roles
from sparseland.activations.sites import get_state


def weight_reads_skipped(model: torch.nn.Module, measured: dict[str, float]) -> float:
    """Fraction of all q/k/v/o/gate/up/down weights skipped, given measured sparsity per site."""
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in linear_roles(model))
    state = get_state(model)
    skipped = 0.0
    for site in state.sites if state is not None else []:
        s = measured.get(site.module, 0.0)
        w = modules[site.module].weight  # (out, in)
        if site.where == "gate_act":
            parent = site.module.rpartition(".")[0]
            skipped += s * (modules[parent + ".up_proj"].weight.numel() + modules[parent + ".down_proj"].weight.numel())
        else:
            skipped += s * w.numel()
            if site.lr_a is not None:
                skipped -= site.lr_a.numel() + site.lr_b.numel()
    return skipped / total
