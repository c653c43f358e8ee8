"""The driver of ``MoEfyConfig``: capture each MLP's inputs on calibration tokens (dense model),
build the experts and the router per layer, and swap the block's ``mlp`` for a ``MoEMLP``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.api import FilterFn, register
from sparseland.errors import SparselandError
from sparseland.moe.config import MoEfyConfig
from sparseland.moe.construct import build_experts, expert_output_norms
from sparseland.moe.module import MoEMLP
from sparseland.moe.router import calibrate_threshold, recall_at_k, train_router


@dataclass
class MoEfyReport:
    construction: str
    router: str
    routing: str
    experts: int
    shared_experts: int
    layers: int = 0
    target_active: list[float] = field(default_factory=list)  # per layer: the budget
    calib_active: list[float] = field(default_factory=list)  # per layer: measured on calibration tokens
    router_recall: list[float] = field(default_factory=list)  # per layer: top-k output-norm experts picked
    router_loss: list[float] = field(default_factory=list)
    router_weight_fraction: float = 0.0  # router weights / MLP weights
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_mlp(mlp: torch.nn.Module, where: str) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, torch.nn.Linear):
            raise SparselandError(
                f"{where} has no Linear {name}: MoE-fication supports gated (Llama-style) MLPs "
                "gate_proj/up_proj/down_proj"
            )
        if lin.bias is not None:
            raise SparselandError(f"{where}.{name} has a bias; MoE-fication supports bias-free gated MLPs")
    if not hasattr(mlp, "act_fn"):
        raise SparselandError(f"{where} has no act_fn; MoE-fication supports gated (Llama-style) MLPs")


@torch.no_grad()
def capture_mlp_inputs(model, layers, calibration: torch.Tensor, n_tokens: int, seed: int) -> list[torch.Tensor]:
    """The inputs x (n_tokens, H) of every layer's MLP, at the same seeded token positions."""
    N, T = calibration.shape
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(N * T, generator=g)[: min(n_tokens, N * T)].sort().values
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    cur: dict[str, torch.Tensor] = {}

    def hook(i):
        def fn(module, args):
            store[i].append(args[0].reshape(-1, args[0].shape[-1])[cur["pos"]].float())

        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        bs = 4
        for b0 in range(0, N, bs):
            batch = calibration[b0 : b0 + bs]
            lo, hi = b0 * T, (b0 + batch.shape[0]) * T
            cur["pos"] = pick[(pick >= lo) & (pick < hi)] - lo
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


def moefy_mlp(mlp: torch.nn.Module, x: torch.Tensor, config: MoEfyConfig, budget: float, seed: int, report) -> MoEMLP:
    """Build the ``MoEMLP`` of one dense MLP from its calibration inputs x (N, H)."""
    Wg, Wu, Wd = mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data
    inter, hidden = Wg.shape
    E, S = config.experts, config.n_shared
    if inter % E:
        raise SparselandError(f"the MLP has {inter} neurons, not divisible by experts={E}; pass a divisor of {inter}")
    h = mlp.act_fn(x @ Wg.float().T) * (x @ Wu.float().T)  # (N, I)
    ex = build_experts(h, E, S, config.construction, top=config.marker_top, iters=config.kmeans_iters, seed=seed)
    k_float = (budget * inter - ex.n_shared) / ex.expert_size  # routed experts per token on average
    k = int(round(k_float))
    new = MoEMLP(
        hidden,
        inter,
        n_shared=ex.n_shared,
        expert_size=ex.expert_size,
        n_routed=ex.n_routed,
        router=config.router,
        router_hidden=config.router_hidden,
        routing=config.routing,
        k=k,
        chunk=config.chunk,
        act_fn=mlp.act_fn,
    ).to(Wg.dtype)
    p = ex.perm
    new.gate_proj.weight.data.copy_(Wg[p])
    new.up_proj.weight.data.copy_(Wu[p])
    new.down_proj.weight.data.copy_(Wd[:, p])
    h = h[:, p]
    norms = expert_output_norms(h, Wd[:, p].float(), ex)  # (N, E_routed)
    if config.router == "analytic":
        new.router.gate.weight.data.copy_(Wg[p][ex.reps])
        new.router.up.weight.data.copy_(Wu[p][ex.reps])
        loss = float("nan")
    else:
        torch.manual_seed(seed)
        new.router.fc1.reset_parameters()
        new.router.fc2.reset_parameters()
        new.router.float()
        loss = train_router(new.router, x, norms, max(1, k), steps=config.router_steps, lr=config.router_lr, seed=seed)
        new.router.to(Wg.dtype)
    scores = new.router(x.to(Wg.dtype)).float()
    if config.routing == "threshold":
        new.threshold.fill_(calibrate_threshold(scores, k_float / ex.n_routed))
    sel = new.select(x.to(Wg.dtype))
    report.router_recall.append(recall_at_k(scores, norms, sel, max(1, k)))
    report.router_loss.append(loss)
    report.calib_active.append((ex.n_shared + float(sel.float().sum(1).mean()) * ex.expert_size) / inter)
    return new


@torch.no_grad()
def moefy_model(
    model: torch.nn.Module,
    config: MoEfyConfig,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
    inputs: list[torch.Tensor] | None = None,
) -> MoEfyReport:
    """Replace every decoder block's MLP (those ``filter_fn(mlp, name)`` accepts) by a ``MoEMLP``.
    ``inputs``: the per-layer MLP inputs ``capture_mlp_inputs`` returned for this calibration (reused
    across configs by benchmarks); None captures them."""
    from sparseland.weights.pruner import decoder_layers, num_threads

    if inputs is None and (calibration is None or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2):
        raise SparselandError(
            "MoEfyConfig needs calibration data: pass calibration=corpus.calibration(16, 512) "
            "(a (N, T) LongTensor of token windows)"
        )
    start = time.perf_counter()
    layers = decoder_layers(model)
    chosen = [
        i
        for i, layer in enumerate(layers)
        if not isinstance(layer.mlp, MoEMLP) and (filter_fn is None or filter_fn(layer.mlp, f"model.layers.{i}.mlp"))
    ]
    for i in chosen:
        check_mlp(layers[i].mlp, f"model.layers.{i}.mlp")
        config.layer_budget(i, len(layers))  # fail before the work on a wrong-length layer_active
    report = MoEfyReport(config.construction, config.router, config.routing, config.experts, config.n_shared)
    was_training = model.training
    model.eval()
    xs = (
        inputs
        if inputs is not None
        else capture_mlp_inputs(model, layers, calibration, config.calib_tokens, config.seed)
    )
    mlp_weights = router_weights = 0
    bar = tqdm(chosen, desc=f"moefy {config.construction}/{config.router}", unit="layer", disable=not progress)
    with num_threads(1):  # k-means and router fitting are loops of small ops: one thread
        for i in bar:
            budget = config.layer_budget(i, len(layers))
            new = moefy_mlp(layers[i].mlp, xs[i], config, budget, config.seed * 1000 + i, report)
            layers[i].mlp = new
            report.target_active.append(budget)
            mlp_weights += 3 * new.gate_proj.weight.numel()
            router_weights += new.router.weight_elements()
    report.layers = len(chosen)
    report.router_weight_fraction = router_weights / max(1, mlp_weights)
    report.seconds = time.perf_counter() - start
    model.train(was_training)
    return report


register(MoEfyConfig)(moefy_model)
