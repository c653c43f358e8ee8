"""ReLU + L1 baseline (Bricken et al. 2023, "Towards Monosemanticity").

Rule: z = ReLU(W_enc (x - b_dec) + b_enc); loss = ||x - x_hat||^2 + l1_coeff * sum_i |z_i| ||W_dec,i||
(the decoder rows are kept unit norm, so the weight is 1). Sparsity is set by ``l1_coeff``, not k.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.nn.functional as F

from sparseland.errors import SparselandError
from sparseland.sae.base import SAE, SAEConfig, mse_n


@dataclasses.dataclass
class ReLUConfig(SAEConfig):
    kind: ClassVar[str] = "sae-relu"
    arch: ClassVar[str] = "relu"
    l1_coeff: float = 0.02

    def validate(self) -> None:
        super().validate()
        if not self.l1_coeff >= 0:
            raise SparselandError(f"l1_coeff={self.l1_coeff} must be >= 0 (larger: sparser)")


class ReLUSAE(SAE):
    config_type = ReLUConfig

    def encode_n(self, x_n):
        return F.relu(self.pre_acts(x_n))

    def loss_n(self, x_n, y_n, dead):
        z = self.encode_n(x_n)
        mse = mse_n(y_n, self.decode_n(z))
        l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        nz = z > 0
        return mse + self.config.l1_coeff * l1, {
            "mse": float(mse.detach()),
            "l0": float(nz.sum()) / len(x_n),
            "fired": nz.any(0),
        }
