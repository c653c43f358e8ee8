"""The calibration driver: block by block through the decoder layers, as the Wanda and SparseGPT
reference code do.

Step 1: run the calibration windows through the embeddings and capture the first block's inputs (hidden
states and the position-embedding / mask kwargs) with a pre-hook that raises to stop the forward.
Step 2 (OWL only): one dense pass over the blocks to measure each block's outlier ratio, then allocate.
Step 3: for each block, one forward over all calibration windows at once, with a pre-hook on each Linear
that collects its input statistics (sum of squares; X^T X when the method needs it) and prunes it before
it runs. So each Linear sees the inputs made by the already-pruned Linears before it in the block (the
"true sequential" order of the SparseGPT reference code), and the block's output is the pruned block's
output: the next block's inputs, with no second forward. Memory: one block's activations of the
calibration windows.

Only the Linear modules inside the decoder blocks are pruned: lm_head and the embeddings stay dense.
``filter_fn(module, name)`` narrows the set further (``name`` is the module's full name).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.api import FilterFn, register
from sparseland.errors import SparselandError
from sparseland.models.arch import decoder_blocks, describe, is_known, router_names
from sparseland.weights.config import (
    DSnoTConfig,
    MagnitudeConfig,
    PruningConfig,
    RandomConfig,
    SparseGPTConfig,
    WandaConfig,
)
from sparseland.weights.dsnot import dsnot_refine
from sparseland.weights.experts import expert_hook, prune_experts_
from sparseland.weights.masks import check_nm_shape, magnitude_scores, make_mask, random_scores, wanda_scores
from sparseland.weights.owl import outlier_ratio, owl_allocation
from sparseland.weights.sparsegpt import sparsegpt_prune

CALIB_BATCH = 8  # calibration windows per block forward


@dataclass
class PruningReport:
    method: str
    pattern: str
    target_sparsity: float
    allocation: str
    block_sparsity: list[float]  # the sparsity asked of each decoder block
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # measured zeros per pruned Linear
    overall_sparsity: float = 0.0  # zeros / weights over the pruned Linears
    seconds: float = 0.0
    calibration_windows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def num_threads(n: int):
    """Temporarily set torch's intra-op threads (tight small-op loops want 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder blocks, where ``sparseland.models.arch`` says they are."""
    return decoder_blocks(model)[1]


def block_prefix(model: torch.nn.Module, i: int) -> str:
    """Module name of block ``i`` ("model.layers.3", "gpt_neox.layers.3")."""
    return f"{decoder_blocks(model)[0]}.{i}"


def block_linears(
    block: torch.nn.Module, prefix: str, filter_fn: FilterFn | None, skip: set[str] | None = None
) -> dict[str, torch.nn.Linear]:
    """The block's Linears by full name; ``skip``: in-block names left out (an MoE block's routers)."""
    out = {}
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}"
        keep = name not in (skip or ()) and (filter_fn is None or filter_fn(mod, full))
        if isinstance(mod, torch.nn.Linear) and keep:
            out[full] = mod
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model, layers, calibration: torch.Tensor, batch_size: int = CALIB_BATCH
) -> list[tuple[torch.Tensor, dict]]:
    """Inputs of the first decoder block for each batch of calibration windows: [(hidden, kwargs)]."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block, batches: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    outs = []
    for hidden, kwargs in batches:
        y = block(hidden, **kwargs)
        outs.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return outs


class InputStats:
    """Running statistics of a Linear's inputs x (in,): count, sum, sum of squares, optional sum x x^T."""

    def __init__(self, in_features: int, gram: bool):
        self.n = 0
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.sumsq = torch.zeros(in_features, dtype=torch.float64)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.n += x.shape[0]
        # float32 terms added into float64 sums (exactly as .double() then +=, without the float64 copy)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        if self.gram is not None:
            self.gram += x.T @ x

    @property
    def norm(self) -> torch.Tensor:  # ||X_j||_2 over all calibration tokens
        return self.sumsq.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.n, 1) - (self.sum / max(self.n, 1)) ** 2).clamp_min(0).float()


@torch.no_grad()
def collect_stats(block, linears: dict[str, torch.nn.Linear], batches, gram: bool) -> dict[str, InputStats]:
    """Run ``block`` on ``batches`` with hooks on ``linears``; Linears fed the same tensor share stats."""
    stats: dict[str, InputStats] = {}
    seen: list[tuple[torch.Tensor, InputStats]] = []  # this batch's input tensors (kept alive) and their stats

    def make_hook(name):
        def hook(module, args, output):
            x = args[0]
            shared = next((st for t, st in seen if t is x), None)
            st = stats.get(name)
            if st is None:
                st = shared or InputStats(x.shape[-1], gram)
                stats[name] = st
            if shared is not st:  # first Linear of this batch fed by x
                st.add(x)
                seen.append((x, st))

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in linears.items()]
    try:
        for hidden, kwargs in batches:
            seen.clear()
            block(hidden, **kwargs)
        seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) % (2**63)


def prune_weight(
    W: torch.Tensor, config: PruningConfig, sparsity: float, stats: InputStats | None, name: str, index: int
) -> torch.Tensor:
    """The pruned weight of one Linear under ``config`` at ``sparsity`` (pure given the statistics)."""
    nm = config.nm
    if nm is not None:
        check_nm_shape(W.shape[1], nm[1], name)
    if isinstance(config, DSnoTConfig):
        W0 = prune_weight(W, config.init_config(), sparsity, stats, name, index)
        with num_threads(1):
            return dsnot_refine(
                W,
                W0,
                stats.gram,
                stats.mean,
                stats.var,
                max_cycles=config.max_cycles,
                update_threshold=config.update_threshold,
                pow_of_var=config.pow_of_var,
                nm=nm,
            )
    if isinstance(config, SparseGPTConfig):
        n, m = nm if nm is not None else (0, 0)
        with num_threads(1):
            return sparsegpt_prune(W, stats.gram, sparsity, n, m, config.blocksize, config.percdamp, name).to(W.dtype)
    if isinstance(config, WandaConfig):
        scores = wanda_scores(W, stats.norm)
    elif isinstance(config, RandomConfig):
        scores = random_scores(W, _layer_seed(config.seed, index))
    elif isinstance(config, MagnitudeConfig):
        scores = magnitude_scores(W)
    else:
        raise SparselandError(f"no pruning rule for {type(config).__name__}")
    # torch.where, not W * mask: a product writes -0.0 for pruned negative weights, which sparse
    # formats (bit-exact, so -0.0 is kept as a value) would then store as nonzeros.
    return torch.where(make_mask(scores, sparsity, nm, name), W, torch.zeros((), dtype=W.dtype))


def quantize_pruned_(
    mod: torch.nn.Linear, config: PruningConfig, sparsity: float, stats: InputStats | None, name: str, index: int
) -> None:
    """Prune and quantize one Linear in place (``config.quant``): SparseGPT quantizes the kept weights
    inside its OBS loop (joint, as in the SparseGPT paper's 50% + 4-bit results); the other methods
    prune, then round the kept weights to nearest with the pruned ones as a mask."""
    from sparseland.quant.apply import attach
    from sparseland.quant.scheme import QuantScheme, quantize_rtn

    scheme = QuantScheme.parse(config.quant)
    W = mod.weight.data
    scheme.group_size(W.shape[1])
    if isinstance(config, SparseGPTConfig):
        from sparseland.weights.sparsegpt import sparsegpt_prune_quantize

        n, m = config.nm if config.nm is not None else (0, 0)
        with num_threads(1):
            qw = sparsegpt_prune_quantize(
                W, stats.gram, sparsity, scheme, n, m, blocksize=config.blocksize, percdamp=config.percdamp
            )
    else:
        pruned = prune_weight(W, config, sparsity, stats, name, index)
        qw = quantize_rtn(pruned, scheme, mask=pruned != 0)
    attach(mod, qw)


def _check_calibration(calibration, config: PruningConfig) -> torch.Tensor:
    if calibration is None:
        raise SparselandError(
            f"{type(config).__name__} needs calibration data: pass calibration=corpus.calibration(64, 512) "
            "(a (N, T) LongTensor of token windows)"
        )
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise SparselandError("calibration must be a (N, T) LongTensor of token ids, e.g. corpus.calibration(64, 512)")
    if calibration.shape[0] == 0 or calibration.shape[1] == 0:
        raise SparselandError("calibration is empty; pass at least one window of tokens")
    return calibration


@torch.no_grad()
def prune_block_in_one_pass(block, linears: dict[str, torch.nn.Linear], batches, gram: bool, prune) -> list:
    """Run ``block`` once on ``batches`` (one batch: all windows), pruning each Linear just before it runs
    with ``prune(name, module, stats)``; Linears fed the same tensor share statistics. Returns the outputs."""
    if len(batches) != 1:
        raise SparselandError("one-pass pruning needs every calibration window in one batch")
    seen: list[tuple[torch.Tensor, InputStats]] = []
    pruned: set[str] = set()

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            st = next((s for t, s in seen if t is x), None)
            if st is None:
                st = InputStats(x.shape[-1], gram)
                st.add(x)
                seen.append((x, st))
            prune(name, module, st)
            pruned.add(name)

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in linears.items()]
    try:
        out = run_block(block, batches)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    missing = [n for n in linears if n not in pruned]
    if missing:
        raise SparselandError(f"{missing[0]} was not called in its block's forward; leave it out with filter_fn")
    return out


@torch.no_grad()
def owl_block_sparsities(model, layers, batches, config: PruningConfig, filter_fn, progress: bool) -> list[float]:
    """Dense pass over the blocks measuring each block's Wanda outlier ratio; OWL allocation of the target."""
    ratios = []
    for i, block in enumerate(tqdm(layers, desc="owl outliers", unit="block", disable=not progress, leave=False)):
        linears = block_linears(block, block_prefix(model, i), filter_fn, router_names(model))
        stats = collect_stats(block, linears, batches, gram=False)
        scores = [wanda_scores(mod.weight, stats[name].norm) for name, mod in linears.items() if name in stats]
        ratios.append(outlier_ratio(scores, config.owl_m) if scores else 0.0)
        batches = run_block(block, batches)
    return owl_allocation(ratios, config.sparsity, config.owl_lambda)


def _check_nm_shapes(model, layers, config: PruningConfig, filter_fn) -> None:
    """Fail early (before any work) on shapes an N:M pattern cannot cover."""
    if config.nm is None:
        return
    for i, block in enumerate(layers):
        for name, mod in block_linears(block, block_prefix(model, i), filter_fn, router_names(model)).items():
            check_nm_shape(mod.in_features, config.nm[1], name)


def _first_block_inputs(model, layers, calibration, config: PruningConfig):
    """``(checked calibration, the first block's inputs)``; ``(calibration, None)`` without calibration."""
    if not config.uses_calibration:
        return calibration, None
    calibration = _check_calibration(calibration, config)
    was_training = model.training
    model.eval()
    batches = capture_block_inputs(model, layers, calibration, batch_size=calibration.shape[0])
    model.train(was_training)
    return calibration, batches


@dataclass
class _Tally:
    """Zeros counted as the Linears (and experts' matrices) are pruned, into the report."""

    report: PruningReport
    zeros: int = 0
    total: int = 0

    def add(self, name: str, zeros: int, numel: int) -> None:
        self.report.layer_sparsity[name] = zeros / numel
        self.zeros += zeros
        self.total += numel


def _block_experts(model, block, i: int, moe, filter_fn):
    """The block's fused MoE experts module to prune (None: no MoE, or left out by ``filter_fn``, or experts
    already split into one Linear per projection (``runtime.experts.ExpertList``), pruned as Linears)."""
    from sparseland.runtime.experts import is_experts

    if moe is None:
        return None
    experts = block.get_submodule(moe.experts)
    if not is_experts(experts):
        return None
    if filter_fn is not None and not filter_fn(experts, f"{block_prefix(model, i)}.{moe.experts}"):
        return None
    return experts


def _prune_one_block(model, i, block, linears, batches, config, sparsity, index, tally, experts, prefix, last):
    """Prune block ``i``'s Linears (and experts) in place; returns ``(next block's inputs, expert
    matrices pruned)``. ``index``: the block's first Linear's position (seeds of random pruning)."""
    position = {name: index + k for k, name in enumerate(linears)}
    expert_done: dict[str, tuple[int, int]] = {}
    base = index + len(linears)

    def prune_matrix(name, W, stats):
        rule = config
        if stats is None and config.needs_calibration:  # an expert no calibration token reached
            rule = MagnitudeConfig(sparsity=config.sparsity, pattern=config.pattern)
        expert = int(name.rpartition(".")[2])  # gate_up_proj.e / down_proj.e: seeds of random pruning
        return prune_weight(W, rule, sparsity, stats, name, base + 2 * expert + ("down_proj" in name))

    def stats_of(x):
        if x is None:
            return None
        st = InputStats(x.shape[-1], config.needs_hessian)
        st.add(x)
        return st

    def prune(name, mod, stats):
        W = mod.weight.data
        if config.quant is not None:
            quantize_pruned_(mod, config, sparsity, stats, name, position[name])
        else:
            W.copy_(prune_weight(W, config, sparsity, stats, name, position[name]))
        tally.add(name, int((W == 0).sum()), W.numel())

    if config.needs_calibration:
        hook = expert_hook(experts, prefix, prune_matrix, stats_of, expert_done) if experts is not None else None
        try:
            batches = prune_block_in_one_pass(block, linears, batches, config.needs_hessian, prune)
        finally:
            if hook is not None:
                hook.remove()
    else:
        for name, mod in linears.items():
            prune(name, mod, None)
        if experts is not None:
            expert_done.update(prune_experts_(experts, prefix, prune_matrix, lambda x: None))
        if batches is not None and not last:
            batches = run_block(block, batches)
    for name, (z, n) in expert_done.items():
        tally.add(name, z, n)
    return batches, len(expert_done)


@torch.no_grad()
def prune_model(
    model: torch.nn.Module,
    config: PruningConfig,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> PruningReport:
    """Prune the Linear modules of ``model``'s decoder blocks in place; see the module docstring."""
    start = time.perf_counter()
    layers = decoder_layers(model)
    n_blocks = len(layers)
    _check_nm_shapes(model, layers, config, filter_fn)
    calibration, batches = _first_block_inputs(model, layers, calibration, config)
    if config.allocation == "owl":
        block_sparsity = owl_block_sparsities(model, layers, batches, config, filter_fn, progress)
    else:
        block_sparsity = [float(config.sparsity)] * n_blocks

    report = PruningReport(
        method=config.kind,
        pattern=config.pattern,
        target_sparsity=float(config.sparsity),
        allocation=config.allocation,
        block_sparsity=block_sparsity,
        calibration_windows=0 if calibration is None or not config.uses_calibration else int(calibration.shape[0]),
    )
    tally = _Tally(report)
    index = 0
    moe = describe(model).moe if is_known(model) else None
    if moe is not None and config.quant is not None:
        raise SparselandError(
            f"quant={config.quant!r}: joint pruning + quantization of MoE experts is not supported; prune "
            "first, then quantize with sparsify_(model, QuantConfig(...))"
        )
    for i, block in enumerate(tqdm(layers, desc=f"prune {config.kind}", unit="block", disable=not progress)):
        linears = block_linears(block, block_prefix(model, i), filter_fn, router_names(model))
        experts = _block_experts(model, block, i, moe, filter_fn)
        prefix = f"{block_prefix(model, i)}.{moe.experts}" if experts is not None else ""
        batches, n_expert = _prune_one_block(
            model, i, block, linears, batches, config, block_sparsity[i], index, tally, experts, prefix,
            last=i + 1 == n_blocks,
        )  # fmt: skip
        index += len(linears) + n_expert
    report.overall_sparsity = tally.zeros / tally.total if tally.total else 0.0
    report.seconds = time.perf_counter() - start
    return report


for _cfg in (MagnitudeConfig, RandomConfig, WandaConfig, SparseGPTConfig, DSnoTConfig):
    register(_cfg)(prune_model)
