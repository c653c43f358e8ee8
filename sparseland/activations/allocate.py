"""Greedy sparsity allocation for a model-wide target (TEAL, section "greedy optimization").

TEAL picks per-tensor sparsities greedily so that the model-wide (parameter-weighted) sparsity hits
the target with the least calibration error. This version works per *tensor group* (q/k/v input,
o input, gate/up input, down input; the same level in every layer) and measures the error
directly as the calibration loss:

    Step 1  for each group g and grid level s: sparsify only g at s, record the increase of the
            mean next-token NLL on the calibration windows -> curve dNLL_g(s) (linear in between).
    Step 2  start all groups at 0; repeatedly raise by ``step`` the group whose loss grows least per
            weight skipped, until sum_g P_g s_g = target * sum_g P_g (P_g: the group's weights).

Treating the groups' losses as additive makes step 2 exact for convex curves. Step 1 costs
``len(groups) * len(grid)`` calibration passes and is shared by every target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseland.activations.calibrate import Samples, linear_roles

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "o": ("o",),
    "gate_up": ("gate", "up"),
    "down": ("down",),
}
GRID = (0.0, 0.25, 0.5, 0.7, 0.85, 0.95)


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 2) -> float:
    """Mean next-token NLL (nats) of ``model`` on ``windows`` (N, T)."""
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        n += batch[:, 1:].numel()
    return total / n


def group_loss_curves(
    model: torch.nn.Module, windows: torch.Tensor, samples: Samples, grid: tuple[float, ...] = GRID
) -> dict[str, list[float]]:
    """Step 1: group -> dNLL at each ``grid`` level (grid[0] must be 0), TEAL thresholds from ``samples``."""
    from sparseland.activations.methods import TEALConfig, apply_teal
    from sparseland.activations.sites import remove

    remove(model)
    base = mean_nll(model, windows)
    curves: dict[str, list[float]] = {}
    for g, roles in GROUPS.items():
        curves[g] = [0.0]
        for s in grid[1:]:
            apply_teal(model, TEALConfig(sparsity=s, targets=roles), samples=samples)
            curves[g].append(max(mean_nll(model, windows) - base, 0.0))
            remove(model)
    return curves


def group_params(model: torch.nn.Module) -> dict[str, int]:
    """Weights per group, over all layers."""
    modules = dict(model.named_modules())
    out = dict.fromkeys(GROUPS, 0)
    for name, role in linear_roles(model).items():
        g = next(k for k, v in GROUPS.items() if role in v)
        out[g] += modules[name].weight.numel()
    return out


def _interp(grid: tuple[float, ...], ys: list[float], s: float) -> float:
    for i in range(1, len(grid)):
        if s <= grid[i]:
            x0, x1, y0, y1 = grid[i - 1], grid[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (s - x0) / (x1 - x0)
    return ys[-1]


def allocate(
    curves: dict[str, list[float]],
    params: dict[str, int],
    target: float,
    grid: tuple[float, ...] = GRID,
    step: float = 0.025,
) -> dict[str, float]:
    """Step 2: per-role sparsities whose parameter-weighted mean is ``target`` (greedy on the curves)."""
    total = sum(params.values())
    level = dict.fromkeys(curves, 0.0)
    cap = grid[-1]
    budget = target * total
    while budget > 1e-9:
        best, best_cost, best_ds = None, float("inf"), 0.0
        for g, s in level.items():
            ds = min(step, cap - s, budget / params[g])
            if ds <= 1e-12:
                continue
            cost = (_interp(grid, curves[g], s + ds) - _interp(grid, curves[g], s)) / (ds * params[g])
            if cost < best_cost:
                best, best_cost, best_ds = g, cost, ds
        if best is None:  # every group at the cap
            break
        level[best] += best_ds
        budget -= best_ds * params[best]
    return {role: round(level[g], 6) for g, roles in GROUPS.items() for role in roles}
