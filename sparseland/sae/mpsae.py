"""MP-SAE (Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations with
Matching Pursuit"): the encoder is matching pursuit over the decoder's unit-norm atoms.

Rule: r_0 = x - b_dec; for t = 1..k: j = argmax_i <r_{t-1}, d_i>, c = <r_{t-1}, d_j>, z_j += c,
r_t = r_{t-1} - c d_j; x_hat = W_dec z + b_dec. Each step leaves the residual orthogonal to the atom
it chose, so ||r_t|| never grows; the dictionary is trained by back-propagating through the k steps.
Only positive inner products are taken (a step with none left stops adding).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from sparseland.sae.base import SAE, SAEConfig, check_k, mse_n


@dataclasses.dataclass
class MPConfig(SAEConfig):
    kind: ClassVar[str] = "sae-mp"
    arch: ClassVar[str] = "mp"
    k: int = 32

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.width)


def matching_pursuit(r: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N, m), residual (N, d))`` after k greedy steps over unit-norm ``atoms`` (m, d)."""
    z = r.new_zeros(r.shape[0], atoms.shape[0])
    rows = torch.arange(r.shape[0])
    for _ in range(k):
        scores = r @ atoms.T  # (N, m)
        c, j = scores.max(dim=1)
        c = c.clamp_min(0)
        z = z.index_put((rows, j), c, accumulate=True)
        r = r - c.unsqueeze(1) * atoms[j]
    return z, r


class MPSAE(SAE):
    config_type = MPConfig

    def encode_n(self, x_n):
        return matching_pursuit(x_n - self.b_dec, self.W_dec, self.config.k)[0]

    def loss_n(self, x_n, y_n, dead):
        z, _ = matching_pursuit(x_n - self.b_dec, self.W_dec, self.config.k)
        mse = mse_n(y_n, self.decode_n(z))
        nz = z > 0
        return mse, {"mse": float(mse.detach()), "l0": float(nz.sum()) / len(x_n), "fired": nz.any(0)}
