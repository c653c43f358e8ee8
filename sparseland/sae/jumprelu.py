"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: ... JumpReLU Sparse Autoencoders").

Rule: z = pre * H(pre - theta) with a learned per-latent threshold theta = exp(log_theta) and
pre = ReLU(W_enc (x - b_dec) + b_enc); loss = ||x - x_hat||^2 + l0_coeff * sum_i H(pre_i - theta_i).
H has zero gradient almost everywhere, so theta learns through straight-through estimators with a
rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps),  d H / d theta = -(1 / eps) K((pre - theta) / eps).
The gradient with respect to ``pre`` is the exact one (H(pre - theta) for the JumpReLU, 0 for H).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparseland.errors import SparselandError
from sparseland.sae.base import SAE, SAEConfig, mse_n


@dataclasses.dataclass
class JumpReLUConfig(SAEConfig):
    kind: ClassVar[str] = "sae-jumprelu"
    arch: ClassVar[str] = "jumprelu"
    l0_coeff: float = 0.002
    bandwidth: float = 0.001
    init_threshold: float = 0.001

    def validate(self) -> None:
        super().validate()
        if not (self.l0_coeff >= 0 and self.bandwidth > 0 and self.init_threshold > 0):
            raise SparselandError(
                f"l0_coeff={self.l0_coeff} must be >= 0, bandwidth={self.bandwidth} and "
                f"init_threshold={self.init_threshold} > 0"
            )


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g * (pre > theta)
        g_theta = (g * (-(theta / eps) * _rect((pre - theta) / eps))).sum(0)
        return g_pre, g_theta, None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        g_theta = (g * (-(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps))).sum(0)
        return torch.zeros_like(pre), g_theta, None


class JumpReLUSAE(SAE):
    config_type = JumpReLUConfig

    def __init__(self, config, d_in, d_out=None, seed=0):
        super().__init__(config, d_in, d_out, seed)
        self.log_theta = nn.Parameter(torch.full((self.width,), math.log(config.init_threshold)))

    def encode_n(self, x_n):
        pre = F.relu(self.pre_acts(x_n))
        return pre * (pre > self.log_theta.exp())

    def loss_n(self, x_n, y_n, dead):
        pre = F.relu(self.pre_acts(x_n))
        theta = self.log_theta.exp()
        eps = self.config.bandwidth
        z = JumpReLUFn.apply(pre, theta, eps)
        mse = mse_n(y_n, self.decode_n(z))
        l0 = StepFn.apply(pre, theta, eps).sum(-1).mean()
        nz = z > 0
        return mse + self.config.l0_coeff * l0, {
            "mse": float(mse.detach()),
            "l0": float(nz.sum()) / len(x_n),
            "fired": nz.any(0),
        }
