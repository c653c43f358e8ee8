"""Compute cost of the sparse + 4-bit single-vector kernels when memory is not the limit: one layer small
enough to stay in L2 (about 0.4 MB), called many times with one thread, timed as the thread's CPU time (so
other processes on a shared machine cost little). Two shapes with the same weight count: short rows
(1536 x 576, SmolLM2's MLP up/gate: 9 steps of 64 columns per row, so per-row work shows) and long rows
(216 x 4096). Printed as microseconds per call and as the multiple of the dense int4 kernel with the same
scheme: above 1, the kernel needs more arithmetic per weight than dense int4, so its fewer bytes only pay off
where dense int4 is memory-bound by at least that factor.

    python benchmarks/probe_qsparse_compute.py [--calls 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_qsparse import SPECS

from sparseland.io import write_results

VARIANTS = [
    "int4 dense g64 sym",
    "bitmask 50% g64 sym",
    "bitmask 50% g64 sym [fill kernels off]",
    "2:4 g64 sym",
    "2:4 g64 sym [fill kernels off]",
    "int4 dense g32 asym (Q4_1 grid)",
    "bitmask 50% g32 asym",
]
SHAPES = [(1536, 576), (216, 4096)]


def _call_us(kind: str, tensors: list[torch.Tensor], x: torch.Tensor, fill: bool, calls: int) -> float:
    prev = torch.ops.sparseland.qsparse_set_fill_kernels(fill)
    try:
        t0 = time.thread_time()
        torch.ops.sparseland.qsparse_bench_pass(kind, tensors, [x], calls)
        return (time.thread_time() - t0) / calls * 1e6
    finally:
        torch.ops.sparseland.qsparse_set_fill_kernels(prev)


def probe(shape: tuple[int, int], calls: int, rounds: int) -> dict[str, float]:
    out, inp = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(inp + 8, generator=g)
    x[-8:] = 0.0
    built = {name: (SPECS[name][0], SPECS[name][1](w), SPECS[name][3]) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):  # interleaved
        for name, (kind, tensors, fill) in built.items():
            times[name].append(_call_us(kind, tensors, x, fill, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    isa = torch.ops.sparseland.qsparse_isa()
    rows, data = [], {"isa": isa, "calls": args.calls, "rounds": args.rounds, "shapes": {}}
    for shape in SHAPES:
        us = probe(shape, args.calls, args.rounds)
        data["shapes"][f"{shape[0]}x{shape[1]}"] = us
        for name, t in us.items():
            ref = SPECS[name][2] or name
            rows.append(f"| {shape[0]} x {shape[1]} | {name} | {t:.1f} | {t / us[ref]:.2f} |")
            print(rows[-1], flush=True)
    md = [
        "# Sparse + 4-bit kernels, compute only (probe_qsparse_compute.py)",
        "",
        f"Command: `python benchmarks/probe_qsparse_compute.py --calls {args.calls} --rounds {args.rounds}`; "
        f"kernel ISA {isa}; one thread, one L2-resident layer, thread CPU time per call (median of interleaved "
        "rounds).",
        "",
        "| shape | variant | us / call | x dense int4 (same scheme) |",
        "|---|---|---:|---:|",
        *rows,
    ]
    write_results(args.out, "qsparse_compute", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
