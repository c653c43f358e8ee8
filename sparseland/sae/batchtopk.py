"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Rule (training): keep the k * B largest ReLU'd pre-activations over the whole batch of B tokens, so
tokens get a variable number of latents averaging k. Inference: a single threshold theta replaces the
batch selection, z = pre * 1[pre > theta]; theta is the running mean (over training batches) of the
smallest kept activation. AuxK revives dead latents as in the TopK SAE.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparseland.sae.base import SAE, SAEConfig, check_k, mse_n
from sparseland.sae.topk import auxk_loss


@dataclasses.dataclass
class BatchTopKConfig(SAEConfig):
    kind: ClassVar[str] = "sae-batchtopk"
    arch: ClassVar[str] = "batchtopk"
    k: int = 32
    aux_k: int = 256
    aux_coeff: float = 1 / 32
    dead_tokens: int = 1_000_000
    threshold_momentum: float = 0.99

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.width)


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, m)`` codes: the k * N largest ReLU'd entries of ``pre`` over the whole batch kept, others 0."""
    acts = F.relu(pre)
    flat = acts.flatten()
    n_keep = min(k * pre.shape[0], flat.numel())
    vals, idx = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


class BatchTopKSAE(SAE):
    config_type = BatchTopKConfig

    def __init__(self, config, d_in, d_out=None, seed=0):
        super().__init__(config, d_in, d_out, seed)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def encode_n(self, x_n):
        pre = self.pre_acts(x_n)
        if self.training or self.threshold < 0:
            return batch_topk(pre, self.config.k)
        return pre * (pre > self.threshold)

    def loss_n(self, x_n, y_n, dead):
        z = batch_topk(self.pre_acts(x_n), self.config.k)
        nz = z > 0
        with torch.no_grad():
            smallest = z[nz].min() if nz.any() else z.new_zeros(())
            m = self.config.threshold_momentum
            new = smallest if self.threshold < 0 else m * self.threshold + (1 - m) * smallest
            self.threshold.copy_(new)
        y_hat = self.decode_n(z)
        mse = mse_n(y_n, y_hat)
        loss = mse
        if self.config.aux_coeff > 0:
            loss = loss + self.config.aux_coeff * auxk_loss(self, x_n, (y_n - y_hat).detach(), dead, self.config.aux_k)
        return loss, {"mse": float(mse.detach()), "l0": float(nz.sum()) / len(x_n), "fired": nz.any(0)}

    @torch.no_grad()
    def after_training(self, batches) -> None:
        mins = []
        for x_n, _ in batches:
            z = batch_topk(self.pre_acts(x_n), self.config.k)
            if (z > 0).any():
                mins.append(float(z[z > 0].min()))
        if mins:
            self.threshold.fill_(sum(mins) / len(mins))
