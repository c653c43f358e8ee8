"""``MoEfyConfig``: turn each dense SiLU-gated MLP into experts with a router, in place, with ``sparsify_``.

    sparsify_(model, MoEfyConfig(experts=16, active=0.5, construction="cmoe"), calibration=calib)

The MLP's neurons (rows of gate/up, columns of down) are split into equal experts, permuted so that
each expert is contiguous; a router picks, per token, which routed experts run. ``active`` is the
fraction of the MLP's neurons that run per token (shared experts included).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError

CONSTRUCTIONS = ("cmoe", "kmeans", "random")
ROUTERS = ("analytic", "learned")
ROUTINGS = ("topk", "threshold")


@dataclasses.dataclass
class MoEfyConfig(SparsityConfig):
    """MoE-fication of the decoder MLPs.

    ``construction``: ``kmeans`` (MoEfication, Zhang et al. 2022: balanced k-means of the neurons'
    co-activation profiles on calibration tokens), ``cmoe`` (CMoE, Pei et al. 2025: the neurons with
    the highest activation rates become always-on shared experts, the rest balanced k-means on binary
    activation markers), ``random`` (a seeded random split: LLaMA-MoE's strong baseline).
    ``shared_experts``: always-on experts (None: 2 for cmoe, 0 otherwise).
    ``router``: ``analytic`` (training-free: each routed expert's representative neuron, the one
    nearest its cluster centroid, scores the expert by |silu(g) * u|) or ``learned`` (a small
    H -> ``router_hidden`` -> E ReLU network trained on calibration tokens to predict the experts with
    the largest output norm ||W_down[:, e] h_e||).
    ``routing``: ``topk`` (a fixed count per token) or ``threshold`` (a per-layer score threshold
    calibrated so the mean active fraction equals the layer's budget). ``layer_active``: optional
    per-layer budgets overriding ``active``. ``chunk``: BlockFFN-style reuse -- during one-token decode
    the experts chosen for a token are kept for ``chunk`` consecutive tokens (1 = route every token).
    """

    kind: ClassVar[str] = "moefy"
    experts: int = 16
    active: float = 0.5
    construction: str = "cmoe"
    shared_experts: int | None = None
    router: str = "analytic"
    routing: str = "topk"
    layer_active: tuple[float, ...] | None = None
    chunk: int = 1
    calib_tokens: int = 4096
    marker_top: float = 0.125  # cmoe: a neuron is "activated" on a token if among this top fraction of |h|
    kmeans_iters: int = 12
    router_hidden: int = 128
    router_steps: int = 300
    router_lr: float = 2e-3
    seed: int = 0

    def validate(self) -> None:
        if not (isinstance(self.experts, int) and self.experts >= 2):
            raise SparselandError(f"experts={self.experts!r} must be an integer >= 2, such as 16")
        if self.construction not in CONSTRUCTIONS:
            raise SparselandError(f"construction={self.construction!r} is not one of {CONSTRUCTIONS}")
        if self.router not in ROUTERS:
            raise SparselandError(f"router={self.router!r} is not one of {ROUTERS}")
        if self.routing not in ROUTINGS:
            raise SparselandError(f"routing={self.routing!r} is not one of {ROUTINGS}")
        for a in (self.active, *(self.layer_active or ())):
            if not (isinstance(a, (int, float)) and 0 < a <= 1):
                raise SparselandError(f"active fraction {a!r} is outside (0, 1]; pass a fraction such as 0.5")
        if self.layer_active is not None:
            self.layer_active = tuple(float(a) for a in self.layer_active)
        shared = self.n_shared
        if not (isinstance(shared, int) and 0 <= shared < self.experts):
            raise SparselandError(
                f"shared_experts={self.shared_experts!r} must be an integer in [0, experts={self.experts})"
            )
        if shared / self.experts > min(self.active, *(self.layer_active or (1.0,))):
            raise SparselandError(
                f"{shared} shared experts of {self.experts} are more than the active fraction {self.active}; "
                "lower shared_experts or raise active"
            )
        for name in ("chunk", "calib_tokens", "kmeans_iters", "router_hidden", "router_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise SparselandError(f"{name}={v!r} must be a positive integer")
        if not 0 < self.marker_top < 1:
            raise SparselandError(f"marker_top={self.marker_top!r} must be in (0, 1), such as 0.125")
        if not self.router_lr > 0:
            raise SparselandError(f"router_lr={self.router_lr!r} must be > 0, such as 2e-3")

    @property
    def n_shared(self) -> int:
        if self.shared_experts is None:
            return 2 if self.construction == "cmoe" else 0
        return self.shared_experts

    def layer_budget(self, layer: int, n_layers: int) -> float:
        if self.layer_active is None:
            return float(self.active)
        if len(self.layer_active) != n_layers:
            raise SparselandError(
                f"layer_active has {len(self.layer_active)} values, the model has {n_layers} layers; "
                "pass one budget per layer"
            )
        return self.layer_active[layer]
