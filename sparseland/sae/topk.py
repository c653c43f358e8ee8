"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Rule: z = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)); x_hat = W_dec z + b_dec. AuxK: the residual
e = x - x_hat is reconstructed from the top ``aux_k`` *dead* latents (no firing for ``dead_tokens``
training tokens), e_hat = W_dec z_aux; loss = mse + aux_coeff * ||e - e_hat||^2 / ||e - mean(e)||^2.
The k selected pre-activations are recomputed from k gathered encoder columns, and decoded from k
rows, so the backward costs O(N k d) instead of O(N m d) (``sparse=False`` uses the dense reference).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparseland.errors import SparselandError
from sparseland.sae.base import SAE, SAEConfig, check_k, mse_n


@dataclasses.dataclass
class TopKConfig(SAEConfig):
    kind: ClassVar[str] = "sae-topk"
    arch: ClassVar[str] = "topk"
    k: int = 32
    aux_k: int = 256
    aux_coeff: float = 1 / 32
    dead_tokens: int = 1_000_000
    sparse: bool = True

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.width)
        if self.aux_k < 0 or self.aux_coeff < 0:
            raise SparselandError(f"aux_k={self.aux_k}, aux_coeff={self.aux_coeff} must be >= 0 (0 turns AuxK off)")


def auxk_loss(sae: SAE, x_n: torch.Tensor, resid: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Gao et al.'s AuxK term: the normalized MSE of reconstructing ``resid`` (the detached main
    residual) from the top ``aux_k`` dead latents; zero when no latent is dead."""
    dead_idx = dead.nonzero().squeeze(1)
    if aux_k == 0 or dead_idx.numel() == 0:
        return x_n.new_zeros(())
    pre = sae.centre(x_n) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]  # (N, n_dead)
    vals, j = pre.topk(min(aux_k, dead_idx.numel()), dim=1)
    e_hat = F.embedding_bag(dead_idx[j], sae.W_dec, per_sample_weights=F.relu(vals), mode="sum")
    denom = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (resid - e_hat).pow(2).sum(-1).mean() / denom


class TopKSAE(SAE):
    config_type = TopKConfig

    def select(self, x_n: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, vals)`` of the k largest pre-activations, ReLU'd; values carry gradients."""
        if self.config.sparse:
            with torch.no_grad():
                idx = self.pre_acts(x_n).topk(k, dim=1).indices
            return idx, F.relu(self.pre_acts_at(x_n, idx))
        vals, idx = self.pre_acts(x_n).topk(k, dim=1)
        return idx, F.relu(vals)

    def encode_n(self, x_n: torch.Tensor) -> torch.Tensor:
        vals, idx = self.pre_acts(x_n).topk(self.config.k, dim=1)
        return torch.zeros(x_n.shape[0], self.width, dtype=vals.dtype).scatter_(1, idx, F.relu(vals))

    def loss_n(self, x_n, y_n, dead):
        idx, vals = self.select(x_n, self.config.k)
        y_hat = self.decode_sparse_n(idx, vals)
        mse = mse_n(y_n, y_hat)
        loss = mse
        if self.config.aux_coeff > 0:
            loss = loss + self.config.aux_coeff * auxk_loss(self, x_n, (y_n - y_hat).detach(), dead, self.config.aux_k)
        fired = torch.zeros(self.width, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        return loss, {"mse": float(mse.detach()), "l0": float((vals > 0).sum()) / len(x_n), "fired": fired}
