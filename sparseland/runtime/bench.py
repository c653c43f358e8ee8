"""Side-by-side runtime measurements: read bandwidth, kernel ratios per layer shape, decode variants.

Everything is measured in one process and interleaved in rounds, so ratios stay fair when another
job shares the cores; warm-up calls are left out of the timings.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sparseland.runtime.formats import make_format
from sparseland.runtime.generate import greedy_generate
from sparseland.runtime.modules import model_bytes, to_sparse_runtime_, weight_bytes

LAYER_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of SmolLM2-135M


def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5, pattern: str | None = None) -> None:
    """Zero the smallest |w| in every Linear but lm_head (per tensor, or per group for ``pattern`` N:M)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                prune_tensor_(mod.weight, sparsity, pattern)


def prune_tensor_(w: torch.Tensor, sparsity: float, pattern: str | None = None) -> torch.Tensor:
    if pattern:
        n, m = (int(v) for v in pattern.split(":"))
        g = w.view(w.shape[0], -1, m)  # (out, in/m, m)
        g.scatter_(-1, g.abs().topk(m - n, dim=-1, largest=False).indices, 0.0)
    elif sparsity > 0:
        k = int(round(w.numel() * sparsity))
        w.view(-1)[w.abs().view(-1).topk(k, largest=False).indices] = 0.0
    return w


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Achieved read bandwidth of a large float32 sum (best of ``reps``)."""
    x = torch.ones(mb * 1024 * 1024 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kernel_ratios(layers: int = 30, rounds: int = 7, seed: int = 0) -> list[dict]:
    """Per layer shape: time of a matvec over ``layers`` distinct weights (more than the caches), per
    variant; ratios are speedups over our dense fp32 kernel."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for out, inp in LAYER_SHAPES:
        ws = [torch.randn(out, inp, generator=g) for _ in range(layers)]
        x = torch.randn(1, inp, generator=g)
        x_act = x * (torch.rand(1, inp, generator=g) < 0.5)  # 50% zero inputs
        variants: dict[str, Callable[[], object]] = {"torch_fp32": lambda ws=ws, x=x: [x @ w.T for w in ws]}

        def add(name, fmt, dtype, sparsity=0.0, pattern=None, xin=x, ws=ws, variants=variants):
            fs = [make_format(prune_tensor_(w.clone(), sparsity, pattern), fmt, dtype) for w in ws]
            variants[name] = lambda fs=fs, xin=xin: [f.matmul(xin) for f in fs]

        add("dense_fp32", "dense", torch.float32)
        add("dense_bf16", "dense", torch.bfloat16)
        add("unstructured50_fp32", "bitmask", torch.float32, 0.5)
        add("unstructured70_fp32", "bitmask", torch.float32, 0.7)
        add("2:4_fp32", "2:4", torch.float32, pattern="2:4")
        add("unstructured50_bf16", "bitmask", torch.bfloat16, 0.5)
        add("2:4_bf16", "2:4", torch.bfloat16, pattern="2:4")
        add("actsparse50_fp32", "actsparse", torch.float32, xin=x_act)
        add("actsparse50_bf16", "actsparse", torch.bfloat16, xin=x_act)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(_timed(fn) / layers)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["dense_fp32"]
        rows.append(
            {
                "shape": f"{out}x{inp}",
                "dense_fp32_us": base * 1e6,
                "dense_fp32_gbs": out * inp * 4 / base / 1e9,
                **{f"{k}_speedup": base / v for k, v in med.items() if k != "dense_fp32"},
            }
        )
    return rows


@dataclass
class Variant:
    name: str
    sparsity: float = 0.0
    pattern: str | None = None
    format: str = "dense"
    value_dtype: str = "float32"
    lm_head_dtype: str = "float32"


DEFAULT_VARIANTS = [
    Variant("dense_fp32"),
    Variant("dense_bf16", value_dtype="bfloat16", lm_head_dtype="bfloat16"),
    Variant("unstructured50_fp32", 0.5, format="bitmask"),
    Variant("2:4_fp32", 0.5, "2:4", format="2:4"),
    Variant("unstructured70_fp32", 0.7, format="bitmask"),
    Variant("unstructured50_bf16", 0.5, format="bitmask", value_dtype="bfloat16", lm_head_dtype="bfloat16"),
    Variant("2:4_bf16", 0.5, "2:4", format="2:4", value_dtype="bfloat16", lm_head_dtype="bfloat16"),
]


def build_variant(dense: torch.nn.Module, v: Variant, already_sparse: bool = False) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    if v.sparsity and not already_sparse:
        magnitude_prune_(model, v.sparsity, v.pattern)
    to_sparse_runtime_(model, format=v.format, value_dtype=v.value_dtype, lm_head_dtype=v.lm_head_dtype)
    return model


def decode_bench(
    dense: torch.nn.Module,
    prompt_ids: torch.Tensor,
    variants: list[Variant] | None = None,
    new_tokens: int = 32,
    rounds: int = 3,
    include_torch_baseline: bool = True,
) -> list[dict]:
    """Build each variant from ``dense`` (magnitude pruning + runtime formats) and time them together."""
    models = build_models(dense, variants or DEFAULT_VARIANTS, include_torch_baseline)
    return time_decode(models, prompt_ids, new_tokens, rounds, base=next(iter(models)))


def build_models(dense: torch.nn.Module, variants: list[Variant], include_torch: bool) -> dict[str, torch.nn.Module]:
    """Each variant from ``dense`` (magnitude pruning once per (sparsity, pattern), reused across dtypes,
    then runtime formats); ``include_torch`` adds the unchanged model as ``torch_linear_fp32``."""
    models: dict[str, torch.nn.Module] = {}
    pruned: dict[tuple, torch.nn.Module] = {}
    for v in variants:
        key = (v.sparsity, v.pattern)
        if v.sparsity and key not in pruned:
            pruned[key] = copy.deepcopy(dense)
            magnitude_prune_(pruned[key], v.sparsity, v.pattern)
        models[v.name] = build_variant(pruned.get(key, dense), v, already_sparse=True)
    del pruned
    if include_torch:
        models["torch_linear_fp32"] = dense  # our loop over the unchanged model (torch's own matvec)
    gc.collect()
    return models


def time_decode(
    models: dict[str, torch.nn.Module], prompt_ids: torch.Tensor, new_tokens: int, rounds: int, base: str
) -> list[dict]:
    """Greedy decode with every model, interleaved over ``rounds``; medians of per-token times, speedups
    over ``models[base]``, and whether each produced the same tokens as the base."""
    per_tok: dict[str, list[float]] = {k: [] for k in models}
    prefill: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    paths: dict[str, tuple[str, str | None]] = {}
    for m in models.values():  # warm-up
        greedy_generate(m, prompt_ids, 4, stop_at_eos=False)
    for _ in range(rounds):
        for name, m in models.items():
            r = greedy_generate(m, prompt_ids, new_tokens, stop_at_eos=False)
            per_tok[name] += r.per_token_seconds
            prefill[name].append(r.prefill_seconds)
            tokens[name] = r.tokens
            paths[name] = (r.path, r.path_reason)
    t_base = statistics.median(per_tok[base])
    rows = []
    for name, m in models.items():
        t = statistics.median(per_tok[name])
        wb = weight_bytes(m)
        rows.append(
            {
                "variant": name,
                "decode_tokens_per_s": 1 / t,
                "speedup": t_base / t,
                "prefill_tokens_per_s": prompt_ids.shape[1] / statistics.median(prefill[name]),
                "weight_bytes_per_token": wb,
                "achieved_gbs": wb / t / 1e9,
                "model_bytes": model_bytes(m),
                "same_tokens_as_base": tokens[name] == tokens[base],
                "path": paths[name][0],  # the decode step that ran: fused (C++) or python
                "path_reason": paths[name][1],  # why not fused
            }
        )
    return rows


def result_dict(**parts: object) -> dict:
    return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in parts.items()}
