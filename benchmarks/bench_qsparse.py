"""Micro-benchmark of the sparse + 4-bit single-vector kernels (q4_bitmask, q4_nm) on a SmolLM2-135M
"model pass": the layer shapes (out, in) = (576, 576), (192, 576), (1536, 576), (576, 1536), each
repeated 30x with its own copy of the weight (about 66M weights, so nothing stays cache-resident),
one input vector (decode), 1 and 2 threads.

Baselines: the dense fp32 and bf16 single-vector kernels (``dense_mv``, as ``dense_mm`` runs them),
and, as the dense int4 reference point, our own q4_bitmask kernel on a fully dense mask (100%
density, g32 asym = Q4_1's grid plus a 1-bit mask): the llama.cpp-style dense ``q4_mm`` of qdense.cpp
is not in this worktree. Timing is done in C++ (``torch.ops.sparseland.qsparse_bench_pass``) so the
Python op-call overhead does not count; variants run interleaved, round after round, in one process,
and per variant the median and the minimum (the least disturbed round: the machine is shared) are
reported, with ratios of minima to dense fp32 and to the dense int4 stand-in, and the median over
rounds of the same-round ratio to the stand-in.

    PYTHONPATH=. python benchmarks/bench_qsparse.py [--rounds 7] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import sparseland.runtime._C  # noqa: F401
import torch

from sparseland.io import write_results
from sparseland.quant.scheme import QuantScheme, quantize_rtn
from sparseland.runtime.qsparse import Q4BitmaskFormat, Q4NMFormat

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
REPEAT = 30


def _bitmask_weight(w: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the largest |w| of each row (unstructured magnitude pruning)."""
    k = max(1, round(density * w.shape[1]))
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(k, dim=1).indices, True)
    return w * keep


def _nm_weight(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    w = w.clone()
    g = w.view(w.shape[0], -1, m)
    g.scatter_(-1, g.abs().topk(m - n, dim=-1, largest=False).indices, 0.0)
    return w


def _tensors(fmt) -> list[torch.Tensor]:
    empty = torch.empty(0, dtype=torch.float16)
    off = fmt.offset if fmt.offset is not None else empty
    if isinstance(fmt, Q4NMFormat):
        return [fmt.mask, fmt.codes, fmt.scale, off]
    return [fmt.mask, fmt.row_ptr, fmt.codes, fmt.scale, off]


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def build_variants() -> dict[str, dict]:
    """name -> {kind, tensors (flat, REPEAT copies), xs, bytes per pass}."""
    g = torch.Generator().manual_seed(0)
    base = {s: torch.randn(*s, generator=g) * 0.05 for s in SHAPES}
    xs = {n: torch.randn(n + 8, generator=g) for n in {s[1] for s in SHAPES}}
    for x in xs.values():
        x[-8:] = 0.0
        x[7] *= 30.0  # an outlier channel
    specs = {
        "dense fp32": ("dense", lambda w: [w.contiguous()]),
        "dense bf16": ("dense", lambda w: [w.to(torch.bfloat16).contiguous()]),
        "q4 dense-mask g32 asym (int4 stand-in)": (
            "q4bitmask",
            lambda w: _tensors(
                Q4BitmaskFormat.from_quantized(quantize_rtn(w, "int4-g32", mask=torch.ones_like(w, dtype=torch.bool)))
            ),
        ),
        "q4 dense-mask g64 asym": (
            "q4bitmask",
            lambda w: _tensors(
                Q4BitmaskFormat.from_quantized(quantize_rtn(w, "int4-g64", mask=torch.ones_like(w, dtype=torch.bool)))
            ),
        ),
        "q4_bitmask 50% sparse g64 asym": (
            "q4bitmask",
            lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.5), "int4-g64")),
        ),
        "q4_bitmask 70% sparse g64 asym": (
            "q4bitmask",
            lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.3), "int4-g64")),
        ),
        "q4_nm 2:4 g64 asym": ("q4nm", lambda w: _tensors(Q4NMFormat.from_dense(_nm_weight(w), "int4-g64"))),
        "q4_nm 2:4 g64 sym": (
            "q4nm",
            lambda w: _tensors(Q4NMFormat.from_dense(_nm_weight(w), QuantScheme(4, 64, True))),
        ),
    }
    variants = {}
    for name, (kind, make) in specs.items():
        one = {s: make(base[s]) for s in SHAPES}
        tensors, xlist, nbytes = [], [], 0
        for _ in range(REPEAT):
            for s in SHAPES:
                copy = [t.clone() for t in one[s]]  # own memory per layer
                tensors += copy
                xlist.append(xs[s[1]])
                nbytes += _nbytes(copy)
        variants[name] = {"kind": kind, "tensors": tensors, "xs": xlist, "bytes": nbytes}
    return variants


def summarize(variants: dict, times: dict[str, list[float]], weights_per_pass: int) -> dict[str, dict]:
    """Per variant: median/min/max time of a pass, bytes, bandwidth and speedups over dense fp32 and the
    int4 stand-in (median, min, and the median of same-round ratios)."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref_fp32 = med["dense fp32"]
    ref_q4_name = "q4 dense-mask g32 asym (int4 stand-in)"
    ref_q4 = med[ref_q4_name]
    rows = {}
    for name, v in variants.items():
        rows[name] = {
            "us_per_pass": med[name] * 1e6,
            "min_us": min(times[name]) * 1e6,
            "max_us": max(times[name]) * 1e6,
            "bytes_per_pass": v["bytes"],
            "bytes_per_weight": v["bytes"] / weights_per_pass,
            "GBps": v["bytes"] / med[name] / 1e9,
            "GBps_at_min": v["bytes"] / min(times[name]) / 1e9,
            "min_speedup_vs_fp32": min(times["dense fp32"]) / min(times[name]),
            "min_speedup_vs_int4_standin": min(times[ref_q4_name]) / min(times[name]),
            "speedup_vs_fp32": ref_fp32 / med[name],
            "speedup_vs_int4_standin": ref_q4 / med[name],
            "paired_ratio_vs_int4_standin": statistics.median(
                a / b for a, b in zip(times[ref_q4_name], times[name], strict=True)
            ),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--reps", type=int, default=1, help="passes per timing")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    t0 = time.time()
    load_before = os.getloadavg()[0]
    variants = build_variants()
    print(f"built {len(variants)} variants in {time.time() - t0:.0f}s; ISA {torch.ops.sparseland.qsparse_isa()}")
    weights_per_pass = REPEAT * sum(o * i for o, i in SHAPES)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, v in variants.items():  # interleaved
                times[name].append(torch.ops.sparseland.qsparse_bench_pass(v["kind"], v["tensors"], v["xs"], args.reps))
        rows = summarize(variants, times, weights_per_pass)
        results[f"{threads}t"] = rows

    load_after = os.getloadavg()[0]
    lines = [
        "# Sparse + 4-bit single-vector kernels (bench_qsparse.py)",
        "",
        f"SmolLM2-135M layer shapes {SHAPES} x {REPEAT} per pass ({weights_per_pass / 1e6:.1f}M weights), one "
        f"vector, median of {args.rounds} interleaved rounds x {args.reps} passes; kernel ISA "
        f"{torch.ops.sparseland.qsparse_isa()}; {platform.processor() or platform.machine()}, shared machine.",
        "",
        "Dense int4 reference point: the llama.cpp-style q4_mm (qdense.cpp) is not in this worktree, so the "
        "stand-in is our q4_bitmask kernel on a 100% dense mask with g32 asym (Q4_1's grid + a 1-bit mask).",
        "",
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs): other jobs "
        "share the cores, so single rounds vary by up to 3x; the same-round ratio (median over rounds) is the "
        "steadiest column, and 2-thread timings are the least reliable (one thread waits for the other).",
        "",
    ]
    for key, rows in results.items():
        lines += [
            f"## {key[:-1]} thread(s)",
            "",
            "| variant | B / weight | us / pass median | min | GB/s at min | x vs fp32 (min) "
            "| x vs int4 stand-in (min) "
            "| same-round x vs stand-in (median) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['bytes_per_weight']:.3f} | {r['us_per_pass']:.0f} | {r['min_us']:.0f} | "
                f"{r['GBps_at_min']:.1f} | {r['min_speedup_vs_fp32']:.2f} | {r['min_speedup_vs_int4_standin']:.2f} | "
                f"{r['paired_ratio_vs_int4_standin']:.2f} |"
            )
        lines.append("")
    md = "\n".join(lines)
    print(md)
    data = {
        "load_avg": [load_before, load_after],
        "shapes": SHAPES,
        "repeat": REPEAT,
        "rounds": args.rounds,
        "reps": args.reps,
        "results": results,
    }
    write_results(args.out, "qsparse", data, md)


if __name__ == "__main__":
    main()
