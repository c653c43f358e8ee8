"""SAE metrics, defined as the issue defines them (and tested against hand computations).

- FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2, with ``mean`` the per-dimension mean of the
  evaluation split, both sums accumulated in float64, in the original activation scale.
- L0: the mean number of nonzero latents per token at inference (BatchTopK's threshold, not k).
- Dead fraction: latents with zero firings over the N evaluation tokens (N is reported).
- Delta CE and KL (nats): the reconstruction spliced into the forward pass, against the clean pass;
  CE recovered against mean ablation (the site replaced by its evaluation mean), and against zero
  ablation beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sparseland.sae.sites import splice


class FVUAccumulator:
    """Sums of squared error and squared deviation from a fixed ``mean``, in float64."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean.to(torch.float64)
        self.sse = 0.0
        self.sst = 0.0
        self.n = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.to(torch.float64)
        self.sse += float(((x64 - x_hat.to(torch.float64)) ** 2).sum())
        self.sst += float(((x64 - self.mean) ** 2).sum())
        self.n += x.shape[0]

    @property
    def fvu(self) -> float:
        return self.sse / self.sst if self.sst > 0 else float("nan")


class SparsityAccumulator:
    """Realised L0 and per-latent firing counts over the tokens seen."""

    def __init__(self, width: int):
        self.fired = torch.zeros(width, dtype=torch.long)
        self.active = 0
        self.n = 0

    def update(self, z: torch.Tensor) -> None:  # z: (N, width) codes, zero where a latent is off
        nz = z != 0
        self.fired += nz.sum(0)
        self.active += int(nz.sum())
        self.n += z.shape[0]

    @property
    def l0(self) -> float:
        return self.active / self.n if self.n else float("nan")

    @property
    def dead_fraction(self) -> float:
        return float((self.fired == 0).float().mean())


def split_mean(batches, d: int) -> torch.Tensor:
    """Per-dimension float64 mean over an iterable of ``(N, d)`` batches."""
    total = torch.zeros(d, dtype=torch.float64)
    n = 0
    for x in batches:
        total += x.to(torch.float64).sum(0)
        n += x.shape[0]
    return total / max(n, 1)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Per-prediction cross-entropy (nats), ``(B, T - 1 - start)``: logits at positions ``start..T-2``
    predicting tokens ``start+1..T-1`` (position 0 is never spliced, so its prediction never changes)."""
    lg = logits[:, start:-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, start + 1 :].reshape(-1), reduction="none").view(
        lg.shape[:2]
    )


def kl_clean_to(logits_clean: torch.Tensor, logits_other: torch.Tensor, start: int = 1) -> torch.Tensor:
    """KL(p_clean || p_other) per position (nats), the same positions as ``next_token_ce``."""
    lp = F.log_softmax(logits_clean[:, start:-1].float(), -1)
    lq = F.log_softmax(logits_other[:, start:-1].float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@dataclass
class SpliceResult:
    ce_clean: float
    ce_spliced: float
    ce_mean_ablation: float
    ce_zero_ablation: float
    kl_nats: float
    n_predictions: int

    @property
    def delta_ce_nats(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def ce_recovered(self) -> float:
        """1 - (CE_spliced - CE_clean) / (CE_mean_ablation - CE_clean)."""
        return (self.ce_mean_ablation - self.ce_spliced) / (self.ce_mean_ablation - self.ce_clean)

    @property
    def ce_recovered_zero(self) -> float:
        return (self.ce_zero_ablation - self.ce_spliced) / (self.ce_zero_ablation - self.ce_clean)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "delta_ce_nats": self.delta_ce_nats,
            "ce_recovered": self.ce_recovered,
            "ce_recovered_zero_ablation": self.ce_recovered_zero,
        }


def splice_metrics(
    model: torch.nn.Module,
    windows: torch.Tensor,
    layer: int,
    site: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    source_site: str | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> SpliceResult:
    """CE of the clean model, with ``site`` replaced by ``reconstruct(source activation)``, by the
    per-dimension ``mean`` and by zeros; and KL(clean || spliced). Position 0 keeps its value in all
    three (it is excluded from the cache, so the SAE never saw it)."""
    sums = {"clean": 0.0, "sae": 0.0, "mean": 0.0, "zero": 0.0, "kl": 0.0}
    n = 0
    mean32 = mean.to(torch.float32)
    variants: dict[str, contextlib.AbstractContextManager] = {}
    for b in range(0, len(windows), batch_size):
        ids = windows[b : b + batch_size]
        variants = {
            "clean": contextlib.nullcontext(),
            "sae": splice(model, layer, site, reconstruct, source_site=source_site),
            "mean": splice(model, layer, site, lambda a: mean32.expand(*a.shape[:-1], -1)),
            "zero": splice(model, layer, site, torch.zeros_like),
        }
        logits = {}
        with torch.inference_mode():
            for name, ctx in variants.items():
                with ctx:
                    logits[name] = model(input_ids=ids).logits
                sums[name] += float(next_token_ce(logits[name], ids).sum())
            sums["kl"] += float(kl_clean_to(logits["clean"], logits["sae"]).sum())
        n += ids.shape[0] * (ids.shape[1] - 2)
        if progress:
            progress(ids.numel())
    return SpliceResult(
        ce_clean=sums["clean"] / n,
        ce_spliced=sums["sae"] / n,
        ce_mean_ablation=sums["mean"] / n,
        ce_zero_ablation=sums["zero"] / n,
        kl_nats=sums["kl"] / n,
        n_predictions=n,
    )
