"""Test helpers: magnitude masks made with torch.topk (independent of sparseland.weights)."""

from __future__ import annotations

import torch


def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5, pattern: str | None = None) -> None:
    """Zero the smallest-magnitude entries of every Linear weight except lm_head, in place."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            w = mod.weight
            if pattern:
                n, m = (int(v) for v in pattern.split(":"))
                g = w.view(w.shape[0], -1, m)  # (out, in/m, m)
                drop = g.abs().topk(m - n, dim=-1, largest=False).indices
                g.scatter_(-1, drop, 0.0)
            else:
                k = int(round(w.numel() * sparsity))
                if k:
                    w.view(-1)[w.abs().view(-1).topk(k, largest=False).indices] = 0.0
