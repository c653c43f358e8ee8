"""OWL (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to
High Sparsity", ICML 2024).

Rule: a block's outlier ratio D is the fraction of its Wanda scores above ``M`` times their mean (M=5);
the ratios are min-max scaled to [0, 2*lambda] (lambda=0.08) and recentred so that the block densities
average to ``1 - target``: blocks with more outliers are pruned less.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseland.errors import SparselandError


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of all entries of ``scores`` (e.g. the Wanda scores of a block's Linears) above m * mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_allocation(outlier_ratios: Sequence[float] | torch.Tensor, target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities from outlier ratios; they average to ``target`` and lie in target +- lam."""
    d = torch.as_tensor(outlier_ratios, dtype=torch.float64).reshape(-1)
    if d.numel() == 0:
        return []
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    density = d - d.mean() + (1 - target)
    sparsity = 1 - density
    if (sparsity < 0).any() or (sparsity >= 1).any():
        raise SparselandError(
            f"OWL with target sparsity {target} and lambda {lam} gives a layer sparsity outside [0, 1); "
            "use a smaller owl_lambda"
        )
    return [float(s) for s in sparsity]
