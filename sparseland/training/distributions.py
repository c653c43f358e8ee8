"""Layer-wise densities (uniform, ERK) and the exact-count masks sparse training starts from.

ERK ("Rigging the Lottery", Evci et al. 2020, after Erdos-Renyi of SET, Mocanu et al. 2018): layer l
gets density ``eps * (n_in + n_out) / (n_in * n_out)``, with ``eps`` chosen so the parameter-weighted
density is the global target; a layer whose density would exceed 1 is made dense and ``eps`` is solved
again for the rest, until no layer exceeds 1. "The Unreasonable Effectiveness of Random Pruning" (Liu et
al. 2022) shows random masks with ERK densities are a strong baseline, so they are shown everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from sparseland.config import check_fraction
from sparseland.errors import SparselandError

DISTRIBUTIONS = ("uniform", "erk")


def check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise SparselandError(f"distribution={distribution!r} is not one of {DISTRIBUTIONS}; 'erk' is the usual choice")


def uniform_densities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Every layer at the same density ``1 - sparsity``."""
    check_fraction("sparsity", sparsity)
    return {name: 1.0 - sparsity for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """ERK densities hitting ``1 - sparsity`` parameter-weighted; layers that would exceed 1 are dense.

    ``shapes`` maps names to ``(n_out, n_in, ...)``; the raw score is ``sum(shape) / prod(shape)`` (for a
    linear layer ``(n_in + n_out) / (n_in * n_out)``), raised to ``power`` (1 in the paper).
    """
    check_fraction("sparsity", sparsity)
    if not shapes:
        return {}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / numel[n]) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        # Step 1: the kept budget left for the sparse layers once the dense ones are paid for in full.
        budget = (1.0 - sparsity) * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:  # every layer dense: only possible when sparsity == 0
            return {n: 1.0 for n in shapes}
        eps = budget / divisor
        # Step 2: cap the layers whose density would exceed 1 and solve again for the others.
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= over


def layer_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str) -> dict[str, float]:
    """Densities by name for ``distribution`` in ``DISTRIBUTIONS``."""
    check_distribution(distribution)
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity)
    return erk_densities(shapes, sparsity)


def n_kept(numel: int, density: float) -> int:
    """How many entries a layer of ``numel`` keeps at ``density``: ``round(density * numel)``."""
    return min(numel, max(0, int(round(density * numel))))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask shaped like ``scores`` keeping exactly its ``k`` highest entries."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random bool mask of ``shape`` with exactly ``round(density * numel)`` entries kept."""
    numel = math.prod(shape)
    keep = torch.randperm(numel, generator=generator)[: n_kept(numel, density)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(tuple(shape))


def random_masks(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], seed: int = 0
) -> dict[str, torch.Tensor]:
    """One exact-count random mask per layer, from one generator seeded with ``seed`` (sorted-name order)."""
    gen = torch.Generator().manual_seed(int(seed))
    return {name: random_mask(shapes[name], densities[name], gen) for name in sorted(shapes)}


def magnitude_masks(weights: Mapping[str, torch.Tensor], densities: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per layer, keep exactly the ``round(density * numel)`` largest ``|W|`` (one-shot magnitude pruning)."""
    return {n: topk_mask(w.detach().abs().float(), n_kept(w.numel(), densities[n])) for n, w in weights.items()}
