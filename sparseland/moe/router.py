"""Router fitting: pure functions on calibration tensors (no model walking).

- ``analytic_router_weights``: CMoE's training-free router, the gate/up rows of each expert's
  representative neuron (the one nearest the centroid of the expert's cluster).
- ``train_router``: the learned router (MoEfication's "MLP router"): a small ReLU network trained with
  binary cross-entropy to mark, per token, the ``k`` experts whose outputs ||W_down[:, e] h_e|| are
  largest.
- ``calibrate_threshold``: the score threshold whose mean keep rate on calibration tokens is the budget.
"""

from __future__ import annotations

import torch

from sparseland.moe.module import MoERouter


def topk_targets(norms: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E) output norms -> (N, E) float multi-hot of each token's k largest."""
    k = max(1, min(k, norms.shape[1]))
    return torch.zeros_like(norms).scatter_(1, norms.topk(k, dim=1).indices, 1.0)


def train_router(
    router: MoERouter,
    x: torch.Tensor,
    norms: torch.Tensor,
    k: int,
    *,
    steps: int,
    lr: float,
    batch: int = 256,
    seed: int = 0,
) -> float:
    """Fit a ``learned`` router in place on x (N, H) with targets the top-k of norms (N, E); returns
    the final mean training loss (BCE)."""
    assert router.kind == "learned"
    y = topk_targets(norms, k)
    pos_weight = ((y.numel() - y.sum()) / y.sum().clamp_min(1)).clamp(max=10.0)  # rare positives count more
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    last = []
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=g)
            loss = loss_fn(router(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step >= steps - 20:
                last.append(float(loss.detach()))
    return sum(last) / max(1, len(last))


def calibrate_threshold(scores: torch.Tensor, keep: float) -> float:
    """The threshold t with mean(scores > t) ~= keep over scores (N, E)."""
    flat = scores.flatten().float()
    if keep >= 1:
        return float(flat.min()) - 1.0
    if keep <= 0:
        return float(flat.max())
    return float(torch.quantile(flat[: 2**24], 1.0 - keep))


def recall_at_k(scores: torch.Tensor, norms: torch.Tensor, sel: torch.Tensor, k: int) -> float:
    """Fraction of each token's k largest-output experts that ``sel`` (N, E) bool picks."""
    truth = topk_targets(norms, k).bool()
    return float((truth & sel).sum() / truth.sum().clamp_min(1))
