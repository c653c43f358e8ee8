"""The MoE MLP that replaces a decoder block's ``mlp``, and its routers.

``MoEMLP`` keeps the dense MLP's three projections (``gate_proj``, ``up_proj``, ``down_proj``) with
their neurons permuted so that expert e is one contiguous slice; shared experts come first and always
run. Per token the router scores the routed experts and the top ``k`` (or those above the layer's
calibrated threshold) run. Many tokens at once (prefill, perplexity, training) compute every neuron
and zero the skipped ones, which is exactly the sparse result; one token at a time (decode) calls
``sparseland.runtime.moe.moe_mlp``, which reads only the active experts' rows of gate/up and rows
of the transposed down projection.
"""

from __future__ import annotations

import torch
from torch import nn


class MoERouter(nn.Module):
    """``analytic`` (CMoE): score_e = |act(g_rep(e)) * u_rep(e)|, the activation of each expert's
    representative neuron, from copies of its gate/up rows. ``learned``: a ReLU MLP H -> r -> E
    (logits; trained to predict the experts of largest output norm)."""

    def __init__(self, kind: str, hidden: int, n_routed: int, router_hidden: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        if kind == "analytic":
            self.gate = nn.Linear(hidden, n_routed, bias=False)
            self.up = nn.Linear(hidden, n_routed, bias=False)
            self.act_fn = act_fn
        else:
            self.fc1 = nn.Linear(hidden, router_hidden)
            self.fc2 = nn.Linear(router_hidden, n_routed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., E)
        if self.kind == "analytic":
            return (self.act_fn(self.gate(x)) * self.up(x)).abs()
        return self.fc2(torch.relu(self.fc1(x)))

    def weight_elements(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MoEMLP(nn.Module):
    def __init__(
        self,
        hidden: int,
        intermediate: int,
        *,
        n_shared: int,
        expert_size: int,
        n_routed: int,
        router: str,
        router_hidden: int,
        routing: str,
        k: int,
        chunk: int,
        act_fn: nn.Module,
    ) -> None:
        super().__init__()
        assert n_shared + n_routed * expert_size == intermediate
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn
        self.router = MoERouter(router, hidden, n_routed, router_hidden, act_fn)
        self.register_buffer("threshold", torch.zeros(()))  # routing="threshold": keep score > threshold
        self.n_shared, self.expert_size, self.n_routed = n_shared, expert_size, n_routed
        self.routing, self.k, self.chunk = routing, k, chunk
        self.reset_stats()
        self._reuse: torch.Tensor | None = None  # chunk reuse: the selection being kept, and for how long
        self._reuse_left = 0
        self._down_t: tuple[tuple, torch.Tensor] | None = None

    def spec(self) -> dict:
        """What it takes to rebuild this module's shape (stored in checkpoints)."""
        r = self.router
        return {
            "n_shared": self.n_shared,
            "expert_size": self.expert_size,
            "n_routed": self.n_routed,
            "router": r.kind,
            "router_hidden": r.fc1.out_features if r.kind == "learned" else 0,
            "routing": self.routing,
            "k": self.k,
            "chunk": self.chunk,
        }

    def reset_stats(self) -> None:
        self.stat_tokens = 0
        self.stat_active = 0.0  # sum over tokens of active neurons

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., E) bool: which routed experts run."""
        scores = self.router(x)
        if self.routing == "threshold":
            return scores > self.threshold
        if self.k >= self.n_routed:
            return torch.ones_like(scores, dtype=torch.bool)
        if self.k == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        idx = scores.topk(self.k, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)

    def neuron_mask(self, sel: torch.Tensor) -> torch.Tensor:
        """(..., E) expert selection -> (..., I) float neuron mask (shared neurons always 1)."""
        routed = sel.to(torch.float32).repeat_interleave(self.expert_size, dim=-1)
        shared = routed.new_ones((*sel.shape[:-1], self.n_shared))
        return torch.cat([shared, routed], -1)

    def _record(self, sel: torch.Tensor) -> None:
        n = sel.numel() // self.n_routed
        self.stat_tokens += n
        self.stat_active += n * self.n_shared + float(sel.sum()) * self.expert_size

    def active_fraction(self) -> float:
        """Mean fraction of neurons that ran per token since ``reset_stats``."""
        inter = self.n_shared + self.n_routed * self.expert_size
        return self.stat_active / max(1, self.stat_tokens) / inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        decode = flat.shape[0] == 1 and not torch.is_grad_enabled()
        if decode and self.chunk > 1 and self._reuse is not None and self._reuse_left > 0:
            sel = self._reuse
            self._reuse_left -= 1
        else:
            sel = self.select(flat)
            if decode and self.chunk > 1:
                self._reuse, self._reuse_left = sel, self.chunk - 1
            elif not decode:
                self._reuse, self._reuse_left = None, 0  # a new prompt: routing starts afresh
        self._record(sel)
        if decode and self._kernel_ready(x):
            from sparseland.runtime.moe import moe_mlp, segments

            y = moe_mlp(flat, self.gate_proj.weight, self.up_proj.weight, self.down_t(), segments(self, sel[0]))
            return y.view_as(x)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (..., I)
        return self.down_proj(h * self.neuron_mask(sel.view(*x.shape[:-1], -1)).to(h.dtype))

    def _kernel_ready(self, x: torch.Tensor) -> bool:
        """The expert-skipping kernel needs plain float32 Linear weights; projections swapped for runtime
        formats (``to_sparse_runtime_``) take the masked path, correct but without skipped reads."""
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        return x.dtype == torch.float32 and all(type(p) is nn.Linear and p.weight.dtype == torch.float32 for p in projs)

    def down_t(self) -> torch.Tensor:
        """down_proj.weight transposed, (I, H) contiguous: an expert is a block of whole rows. Cached
        until the weight changes."""
        w = self.down_proj.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if self._down_t is None or self._down_t[0] != key:
            self._down_t = (key, w.detach().t().contiguous())
        return self._down_t[1]


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """The model's MoE MLPs by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEMLP)}
