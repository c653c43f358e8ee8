"""What every sparse dictionary shares: the config base, the parameters, input scaling, the decoder
kept unit-norm, and the sparse decode (only the active decoder rows are read and get gradients).

An SAE reads ``x`` (d_in) and writes ``x_hat`` (d_out): for an SAE the same site, for a transcoder
(Dunefsky et al. 2024) the MLP's input and its output. Inputs are divided by a fixed scalar
``scale_in`` (so that E||x||^2 = d_in on the training data) and outputs multiplied by ``scale_out``;
``encode``/``decode``/``forward`` take and return the original scale, so every metric is in it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError

ARCHS: dict[str, type[SAE]] = {}


@dataclasses.dataclass
class SAEConfig(SparsityConfig):
    """Shared fields: ``width`` (latents), ``transcoder`` (read mlp_in, write mlp_out)."""

    kind: ClassVar[str] = "sae"
    arch: ClassVar[str] = "base"
    width: int = 9216
    transcoder: bool = False

    def validate(self) -> None:
        if not isinstance(self.width, int) or self.width < 1:
            raise SparselandError(f"width={self.width!r} must be a positive integer (latents), e.g. 9216")

    @property
    def target_l0(self) -> float | None:
        """The L0 the method aims at, when it has one (k); ``None`` for penalty-controlled methods."""
        k = getattr(self, "k", None)
        return float(k) if k is not None else None


def check_k(k: int, width: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= width:
        raise SparselandError(f"k={k!r} must be an integer in [1, width={width}]")


class SAE(nn.Module):
    """Base module. Subclasses implement ``encode_n`` (normalized input -> codes) and ``loss_n``."""

    config_type: ClassVar[type[SAEConfig]] = SAEConfig

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "config_type" in cls.__dict__:
            ARCHS[cls.config_type.arch] = cls

    def __init__(self, config: SAEConfig, d_in: int, d_out: int | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.d_in, self.d_out, self.width = d_in, d_out or d_in, config.width
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(self.width, self.d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # (m, d_out), rows unit norm
        # an SAE's encoder starts as the decoder's transpose (Gao et al. 2024); a transcoder's input and
        # output spaces differ, so its encoder starts as independent random unit columns
        if config.transcoder:
            w_enc = torch.randn(d_in, self.width, generator=gen)
            w_enc /= w_enc.norm(dim=0, keepdim=True)
        else:
            w_enc = w_dec.T.clone()
        self.W_enc = nn.Parameter(w_enc)  # (d_in, m)
        self.b_enc = nn.Parameter(torch.zeros(self.width))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # a transcoder's input is centred by its own learned bias (an SAE uses b_dec: input = output site)
        self.b_in = nn.Parameter(torch.zeros(self.d_in)) if config.transcoder else None
        self.register_buffer("scale_in", torch.tensor(1.0))
        self.register_buffer("scale_out", torch.tensor(1.0))

    # ---- scaling and the shared linear maps ----
    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """``(N, m)`` encoder pre-activations of normalized inputs (an SAE subtracts b_dec first)."""
        return self.centre(x_n) @ self.W_enc + self.b_enc

    def centre(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n - (self.b_in if self.config.transcoder else self.b_dec)

    def pre_acts_at(self, x_n: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Pre-activations of only the latents ``idx`` (N, k): gathers k encoder columns per row, so the
        backward touches k columns instead of all m (Gao et al.'s sparse kernels, in torch)."""
        cols = F.embedding(idx, self.W_enc.T)  # (N, k, d_in)
        return torch.bmm(cols, self.centre(x_n).unsqueeze(-1)).squeeze(-1) + self.b_enc[idx]

    def decode_n(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_sparse_n(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Decode ``(N, k)`` indices and values: reads (and back-propagates into) only those rows."""
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec

    def set_scales(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Fix the input (and output) scale so that E||x / scale||^2 = d on this sample."""
        self.scale_in.fill_(float((x.double().pow(2).sum(1).mean() / x.shape[1]).sqrt()))
        y = x if y is None else y
        self.scale_out.fill_(float((y.double().pow(2).sum(1).mean() / y.shape[1]).sqrt()))

    # ---- public API, original scale ----
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, m)`` codes (zero where a latent is off) of inputs in the original scale."""
        return self.encode_n(x / self.scale_in)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_n(z) * self.scale_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        return self.decode(self.encode(x2)).reshape(*shape[:-1], self.d_out)

    # ---- training hooks ----
    def encode_n(self, x_n: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_n(self, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(loss, info)`` on normalized inputs/targets; ``dead`` (m,) bool marks latents that have not
        fired for a while. ``info`` holds ``mse`` (float), ``l0`` (float) and ``fired`` ((m,) bool)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalize the decoder rows to unit norm (every method here keeps them so)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (it would only change the norm
        that ``after_step`` resets)."""
        g = self.W_dec.grad
        if g is not None:
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def after_training(self, batches) -> None:
        """Called once at the end with an iterable of normalized ``(x_n, y_n)`` training batches."""

    @torch.no_grad()
    def init_from_data(self, x_n: torch.Tensor, y_n: torch.Tensor) -> None:
        """b_dec starts at the mean of the (normalized) targets (a transcoder's b_in at the inputs')."""
        self.b_dec.copy_(y_n.mean(0))
        if self.b_in is not None:
            self.b_in.copy_(x_n.mean(0))


def mse_n(y_n: torch.Tensor, y_hat_n: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the summed squared error (normalized units)."""
    return (y_n - y_hat_n).pow(2).sum(-1).mean()


def build_sae(config: SAEConfig, d_in: int, d_out: int | None = None, seed: int = 0) -> SAE:
    if config.arch not in ARCHS:
        raise SparselandError(f"unknown architecture {config.arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[config.arch](config, d_in, d_out, seed=seed)
