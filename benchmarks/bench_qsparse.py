"""Micro-benchmark of the sparse + 4-bit single-vector kernels (q4_bitmask, q4_nm) against the dense int4
kernel (qdense.cpp's q4, what the fused step runs for a dense int4 Linear) on a SmolLM2-135M "model pass": the
layer shapes (out, in) = (576, 576), (192, 576), (1536, 576), (576, 1536), each repeated 30x with its own copy
of the weight (about 66M weights, so nothing stays cache-resident), one input vector (decode), 1 and 2 threads.

Timing is done in C++ (``torch.ops.sparseland.qsparse_bench_pass``) so the Python op-call overhead does not
count; variants run interleaved, round after round, in one process; each sparse variant is reported as the
median over rounds of its same-round time ratio to the dense int4 kernel with the same quantization scheme.
Variants named "fill kernels off" turn off the symmetric fill / expand-once kernels
(``qsparse_set_fill_kernels(False)``): the ablation of what they buy.

    python benchmarks/bench_qsparse.py [--rounds 25] [--threads 1 2] [--variants "2:4 g64 sym,..."]
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
from sparseland.quant.scheme import QuantScheme
from sparseland.runtime.qformats import Q4DenseFormat
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
    if isinstance(fmt, Q4DenseFormat):
        return [fmt.codes, fmt.scale, off]
    if isinstance(fmt, Q4NMFormat):
        return [fmt.mask, fmt.codes, fmt.scale, off]
    return [fmt.mask, fmt.row_ptr, fmt.codes, fmt.scale, off]


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


SYM32, SYM64 = QuantScheme(4, 32, True), QuantScheme(4, 64, True)
# name -> (kernel kind, weight -> tensors, the dense int4 variant with the same scheme, fill kernels on)
SPECS = {
    "dense fp32": ("dense", lambda w: [w.contiguous()], None, True),
    "dense bf16": ("dense", lambda w: [w.to(torch.bfloat16).contiguous()], None, True),
    "int4 dense g32 asym (Q4_1 grid)": ("q4", lambda w: _tensors(Q4DenseFormat.from_dense(w, "int4-g32")), None, True),
    "int4 dense g32 sym": ("q4", lambda w: _tensors(Q4DenseFormat.from_dense(w, SYM32)), None, True),
    "int4 dense g64 sym": ("q4", lambda w: _tensors(Q4DenseFormat.from_dense(w, SYM64)), None, True),
    "bitmask 50% g32 asym": (
        "q4bitmask",
        lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.5), "int4-g32")),
        "int4 dense g32 asym (Q4_1 grid)",
        True,
    ),
    "bitmask 50% g32 sym": (
        "q4bitmask",
        lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.5), SYM32)),
        "int4 dense g32 sym",
        True,
    ),
    "bitmask 50% g64 sym": (
        "q4bitmask",
        lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.5), SYM64)),
        "int4 dense g64 sym",
        True,
    ),
    "bitmask 50% g64 sym [fill kernels off]": (
        "q4bitmask",
        lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.5), SYM64)),
        "int4 dense g64 sym",
        False,
    ),
    "bitmask 70% g64 sym": (
        "q4bitmask",
        lambda w: _tensors(Q4BitmaskFormat.from_dense(_bitmask_weight(w, 0.3), SYM64)),
        "int4 dense g64 sym",
        True,
    ),
    "2:4 g64 sym": (
        "q4nm",
        lambda w: _tensors(Q4NMFormat.from_dense(_nm_weight(w), SYM64)),
        "int4 dense g64 sym",
        True,
    ),
    "2:4 g64 sym [fill kernels off]": (
        "q4nm",
        lambda w: _tensors(Q4NMFormat.from_dense(_nm_weight(w), SYM64)),
        "int4 dense g64 sym",
        False,
    ),
}


def build_variants(names: list[str]) -> dict[str, dict]:
    """name -> {kind, tensors (flat, REPEAT copies), xs, bytes per pass, reference, fill}."""
    g = torch.Generator().manual_seed(0)
    base = {s: torch.randn(*s, generator=g) * 0.05 for s in SHAPES}
    xs = {n: torch.randn(n + 8, generator=g) for n in {s[1] for s in SHAPES}}
    for x in xs.values():
        x[-8:] = 0.0
        x[7] *= 30.0  # an outlier channel
    variants = {}
    for name in names:
        kind, make, ref, fill = SPECS[name]
        one = {s: make(base[s]) for s in SHAPES}
        tensors, xlist, nbytes = [], [], 0
        for _ in range(REPEAT):
            for s in SHAPES:
                copy = [t.clone() for t in one[s]]  # own memory per layer
                tensors += copy
                xlist.append(xs[s[1]])
                nbytes += _nbytes(copy)
        variants[name] = {"kind": kind, "tensors": tensors, "xs": xlist, "bytes": nbytes, "ref": ref, "fill": fill}
    return variants


def _time(v: dict, reps: int) -> float:
    prev = torch.ops.sparseland.qsparse_set_fill_kernels(v["fill"])
    try:
        return torch.ops.sparseland.qsparse_bench_pass(v["kind"], v["tensors"], v["xs"], reps)
    finally:
        torch.ops.sparseland.qsparse_set_fill_kernels(prev)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--reps", type=int, default=1, help="passes per timing")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", default=",".join(SPECS), help="comma-separated names (default: all)")
    ap.add_argument("--name", default="qsparse", help="results file stem")
    ap.add_argument("--prefill-tokens", type=int, nargs="*", default=[64, 512], help="prefill T (none: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(SPECS)}")
    args.names = names + [SPECS[n][2] for n in names if SPECS[n][2] and SPECS[n][2] not in names]
    return args


def _paired(times: dict[str, list[float]], ref: str | None, name: str) -> float | None:
    """Median over rounds of time(ref) / time(name) in the same round."""
    if not ref or ref not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[ref], times[name], strict=True))


def measure(variants: dict, threads: int, rounds: int, reps: int, weights_per_pass: int) -> dict[str, dict]:
    """Every variant once per round, interleaved; per variant its times and same-round ratios."""
    torch.set_num_threads(threads)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            times[name].append(_time(v, reps))
    return {
        name: {
            "us_per_pass": statistics.median(times[name]) * 1e6,
            "min_us": min(times[name]) * 1e6,
            "bytes_per_pass": v["bytes"],
            "bytes_per_weight": v["bytes"] / weights_per_pass,
            "GBps_at_min": v["bytes"] / min(times[name]) / 1e9,
            "reference": v["ref"],
            "paired_ratio_vs_reference": _paired(times, v["ref"], name),
            "paired_ratio_vs_fp32": _paired(times, "dense fp32", name),
        }
        for name, v in variants.items()
    }


def render(args: argparse.Namespace, results: dict, loads: tuple[float, float], weights_per_pass: int) -> str:
    lines = [
        "# Sparse + 4-bit single-vector kernels against the dense int4 kernel (bench_qsparse.py)",
        "",
        f"Command: `python benchmarks/bench_qsparse.py --rounds {args.rounds} --reps {args.reps} --threads "
        f"{' '.join(map(str, args.threads))}`. SmolLM2-135M layer shapes {SHAPES} x {REPEAT} per pass "
        f"({weights_per_pass / 1e6:.1f}M weights, each layer its own copy), one vector (decode), every variant "
        f"interleaved round after round ({args.rounds} rounds x {args.reps} passes), timed in C++ "
        f"(`qsparse_bench_pass`); kernel ISA {torch.ops.sparseland.qsparse_isa()}; "
        f"{platform.processor() or platform.machine()}. 1-minute load average {loads[0]:.1f} before, "
        f"{loads[1]:.1f} after ({os.cpu_count()} CPUs).",
        "",
        "'x vs dense int4' is the median over rounds of the same-round time ratio to the dense int4 kernel "
        "(qdense.cpp's q4, the fused step's dense int4 kind) with the same scheme; '[fill kernels off]' runs the "
        "symmetric sparse weights through the per-step kernels the fill kernels replace (the ablation).",
        "",
    ]
    for key, rows in results.items():
        lines += [
            f"## {key[:-1]} thread(s)",
            "",
            "| variant | bytes / weight | us / pass (median) | min | GB/s at min | x vs dense fp32 | x vs dense int4 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            vs_ref = f"{r['paired_ratio_vs_reference']:.2f} ({r['reference']})" if r["reference"] else "-"
            vs_fp32 = f"{r['paired_ratio_vs_fp32']:.2f}" if r["paired_ratio_vs_fp32"] else "-"
            lines.append(
                f"| {name} | {r['bytes_per_weight']:.3f} | {r['us_per_pass']:.0f} | {r['min_us']:.0f} | "
                f"{r['GBps_at_min']:.1f} | {vs_fp32} | {vs_ref} |"
            )
        lines.append("")
    return "\n".join(lines)


PREFILL_VARIANTS = [
    "int4 dense g32 asym (Q4_1 grid)",
    "int4 dense g64 sym",
    "bitmask 50% g32 asym",
    "bitmask 50% g64 sym",
    "bitmask 50% g64 sym [fill kernels off]",
    "2:4 g64 sym",
    "2:4 g64 sym [fill kernels off]",
]


def _prefill_format(name: str, w: torch.Tensor):
    """The runtime format object of a variant (its .matmul is the prefill entry point)."""
    _, make, _, _ = SPECS[name]
    ts = make(w)
    kind = SPECS[name][0]
    off = ts[-1] if ts[-1].numel() else None
    if kind == "q4":
        group = 2 * ts[0].shape[1] // ts[1].shape[1]
        return lambda x: torch.ops.sparseland.q4_mm(ts[0], ts[1], off, group, x)
    if kind == "q4nm":
        return lambda x: torch.ops.sparseland.q4nm_mm(ts[0], ts[1], ts[2], off, x)
    return lambda x: torch.ops.sparseland.q4bitmask_mm(ts[0], ts[1], ts[2], ts[3], off, x)


def measure_prefill(tokens: list[int], rounds: int, threads: int) -> dict[str, dict[str, float]]:
    """(T, in) @ W^T over the four layer shapes, once each per round, interleaved with torch's fp32 linear:
    per variant and T the median over rounds of the same-round time ratio to fp32 (higher: faster)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, generator=g) * 0.05 for s in SHAPES]
    fns = {"torch linear fp32": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws]}
    for name in PREFILL_VARIANTS:
        fns[name] = [_prefill_format(name, w) for w in ws]
    out = {}
    for t in tokens:
        xs = [torch.randn(t, s[1], generator=g) for s in SHAPES]
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fs in fns.items():
                fill = not name.endswith("[fill kernels off]")
                prev = torch.ops.sparseland.qsparse_set_fill_kernels(fill)
                t0 = time.perf_counter()
                for f, x in zip(fs, xs, strict=True):
                    f(x)
                times[name].append(time.perf_counter() - t0)
                torch.ops.sparseland.qsparse_set_fill_kernels(prev)
        out[str(t)] = {
            name: {"ms": statistics.median(ts) * 1e3, "x_vs_fp32": _paired(times, "torch linear fp32", name)}
            for name, ts in times.items()
        }
    return out


def render_prefill(prefill: dict, threads: int) -> list[str]:
    lines = [
        f"## Prefill: (T, in) x W^T over the four layer shapes, {threads} thread(s)",
        "",
        "Same-round time ratio to torch's fp32 linear (median over rounds; > 1: faster than fp32).",
        "",
        "| variant | " + " | ".join(f"T = {t}: ms | x vs fp32" for t in prefill) + " |",
        "|---|" + "---:|---:|" * len(prefill),
    ]
    for name in next(iter(prefill.values())):
        cells = " | ".join(f"{prefill[t][name]['ms']:.2f} | {prefill[t][name]['x_vs_fp32'] or 1:.2f}" for t in prefill)
        lines.append(f"| {name} | {cells} |")
    return lines + [""]


def main() -> None:
    args = _args()
    t0 = time.time()
    load_before = os.getloadavg()[0]
    variants = build_variants(args.names)
    print(f"built {len(variants)} variants in {time.time() - t0:.0f}s; ISA {torch.ops.sparseland.qsparse_isa()}")
    weights_per_pass = REPEAT * sum(o * i for o, i in SHAPES)
    results = {f"{t}t": measure(variants, t, args.rounds, args.reps, weights_per_pass) for t in args.threads}
    threads = max(args.threads)
    prefill = measure_prefill(args.prefill_tokens, args.rounds, threads) if args.prefill_tokens else {}
    loads = (load_before, os.getloadavg()[0])
    md = render(args, results, loads, weights_per_pass)
    if prefill:
        md += "\n" + "\n".join(render_prefill(prefill, threads))
    print(md)
    data = {
        "load_avg": list(loads),
        "shapes": SHAPES,
        "repeat": REPEAT,
        "rounds": args.rounds,
        "reps": args.reps,
        "results": results,
        "prefill": prefill,
    }
    write_results(args.out, args.name, data, md)


if __name__ == "__main__":
    main()
