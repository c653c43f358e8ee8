"""Sparse model soups ("Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging", Zimmer et
al. 2024): average the parameters of models that share one sparsity mask; the average keeps that mask.

Models with different masks are refused: their average would be denser than either (the union of the
supports), which is exactly what a soup of sparse models must not do.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from sparseland.errors import SparselandError
from sparseland.training.masking import ParamFilter, default_filter


@torch.no_grad()
def sparse_soup(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float] | None = None,
    filter_fn: ParamFilter = default_filter,
) -> torch.nn.Module:
    """A new model whose parameters are the (``weights``-weighted) mean of ``models``' parameters.

    Every parameter selected by ``filter_fn`` must have the same zero pattern (mask) in all models; the
    first one that differs is named in the error. The result is re-masked so an average that cancels to a
    kept zero cannot happen silently: it has exactly the shared mask's zeros (plus any exact cancellation).
    """
    models = list(models)
    if not models:
        raise SparselandError("sparse_soup needs at least one model")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise SparselandError(f"got {len(weights)} weights for {len(models)} models; pass one weight per model")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise SparselandError(f"weights={weights} must be non-negative and sum to 1")
    named = [dict(m.named_parameters()) for m in models]
    ref = named[0]
    for i, params in enumerate(named[1:], start=1):
        if params.keys() != ref.keys():
            missing = sorted(set(ref) ^ set(params))[:3]
            raise SparselandError(
                f"model {i} has different parameters from model 0 (e.g. {missing}); soups need one architecture"
            )
        for name, p in ref.items():
            q = params[name]
            if q.shape != p.shape:
                raise SparselandError(
                    f"parameter {name!r} has shape {tuple(q.shape)} in model {i}, {tuple(p.shape)} in model 0"
                )
            if filter_fn(name, p) and not torch.equal(p != 0, q != 0):
                n_diff = int(((p != 0) != (q != 0)).sum())
                raise SparselandError(
                    f"model {i} has a different mask from model 0 at parameter {name!r} ({n_diff} entries differ); "
                    "a sparse soup averages only models that share one mask (e.g. fine-tuned from one pruned model)"
                )
    soup = copy.deepcopy(models[0])
    for name, p in soup.named_parameters():
        avg = sum(w * params[name].detach() for w, params in zip(weights, named, strict=True))
        p.copy_(avg)
        if filter_fn(name, p):
            p.masked_fill_(ref[name] == 0, 0.0)
    return soup
