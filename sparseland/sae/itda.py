"""ITDA (Leask et al. 2025, "Inference-Time Decomposition of Activations"): a dictionary built from
the activations themselves, with no gradient training.

Rule: start with an empty dictionary; for each batch, decompose every activation by matching pursuit
(k steps) over the current atoms; every activation whose relative error ||x - x_hat|| / ||x|| exceeds
``error_threshold`` is added, normalized, as a new atom (until ``width`` atoms). Encoding is the
same matching pursuit. The atoms are unit-norm copies of real activations (the test checks it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from sparseland.errors import SparselandError
from sparseland.sae.base import SAE, SAEConfig, check_k
from sparseland.sae.mpsae import matching_pursuit


@dataclasses.dataclass
class ITDAConfig(SAEConfig):
    kind: ClassVar[str] = "sae-itda"
    arch: ClassVar[str] = "itda"
    k: int = 32
    error_threshold: float = 0.3

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.width)
        if not 0 < self.error_threshold < 1:
            raise SparselandError(f"error_threshold={self.error_threshold} must be in (0, 1), e.g. 0.3")
        if self.transcoder:
            raise SparselandError("ITDA here is an SAE only; pass --arch topk (or another) for a transcoder")


class ITDA(SAE):
    config_type = ITDAConfig
    gradient_free = True

    def __init__(self, config, d_in, d_out=None, seed=0):
        super().__init__(config, d_in, d_out, seed)
        with torch.no_grad():
            self.W_dec.zero_()
        self.register_buffer("n_atoms", torch.tensor(0))

    def encode_n(self, x_n):
        n = int(self.n_atoms)
        z = x_n.new_zeros(x_n.shape[0], self.width)
        if n:
            z[:, :n] = matching_pursuit(x_n - self.b_dec, self.W_dec[:n], min(self.config.k, n))[0]
        return z

    @torch.no_grad()
    def add_batch(self, x_n: torch.Tensor) -> int:
        """Decompose ``x_n`` over the current atoms and add the badly reconstructed rows; returns how many."""
        n = int(self.n_atoms)
        if n:
            _, r = matching_pursuit(x_n, self.W_dec[:n], min(self.config.k, n))
            err = r.norm(dim=1) / x_n.norm(dim=1).clamp_min(1e-12)
            new = x_n[err > self.config.error_threshold]
        else:
            new = x_n[: self.config.k]  # seed the dictionary
        new = new[: self.width - n]
        if len(new):
            self.W_dec[n : n + len(new)] = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.n_atoms.fill_(n + len(new))
        return len(new)

    def fit(self, batches) -> None:
        for x_n, _ in batches:
            self.add_batch(x_n)
            if int(self.n_atoms) >= self.width:
                break

    def loss_n(self, x_n, y_n, dead):  # pragma: no cover - ITDA is not trained by gradient
        raise SparselandError("ITDA is built by `fit`, not trained by gradient")

    def after_step(self) -> None:  # keep unused (zero) atoms at zero
        pass

    def init_from_data(self, x_n, y_n) -> None:  # b_dec stays zero: atoms are raw activations
        pass
