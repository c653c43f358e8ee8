"""Micro-benchmark of the dense quantized kernels (csrc/qdense.cpp) -> benchmarks/results/qkernels.{json,md}.

Decode: one single-vector pass over SmolLM2-135M's linear layers, 30 x (q, k, v, o, gate, up, down) =
(576,576), (192,576), (192,576), (576,576), (1536,576), (1536,576), (576,1536), ~106M weights, each
layer its own copy so the pass streams the weights from memory as a model pass does. The pass runs
in C++ (torch.ops.sparseland.qmv_chain: the q4_mv / q8_mv / dense_mv entry points of the fused
decode step, rows split with parallel_rows), so Python adds nothing per matvec. Variants are
interleaved in rounds; medians per pass and the median of the per-round ratios to dense fp32.
Prefill: (1536,576) and (576,1536) at B = 64 and 512, q4 / q8 op vs torch.nn.functional.linear on the
float32 weight, interleaved too.
Run under the shared lock:  flock /tmp/sparseland-heavy.lock python benchmarks/bench_qkernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sparseland.io import write_results
from sparseland.quant.scheme import quantize_rtn
from sparseland.runtime import kernels
from sparseland.runtime import qformats as Q

OUT = Path(__file__).parent / "results"
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
DECODE = ["dense_fp32", "dense_bf16", "q8", "q4_g32_asym", "q4_g32_sym", "q4_g64_asym", "q4_g128_asym"]
SCHEMES = {
    "q8": "int8",
    "q4_g32_asym": "int4-g32",
    "q4_g32_sym": "int4-g32-sym",
    "q4_g64_asym": "int4-g64",
    "q4_g128_asym": "int4-g128",
}


def build_chain(name: str, layers: int, base: dict) -> dict:
    """Tensors of one variant for `layers` layers: every layer its own copy of the shape's weight."""
    ws, scales, offsets, group, nbytes, skipped = [], [], [], 0, 0, 0
    for _ in range(layers):
        for shape in LAYER:
            w = base[shape]
            if name == "dense_fp32":
                ws.append(w.clone())
            elif name == "dense_bf16":
                ws.append(w.to(torch.bfloat16))
            else:
                s = SCHEMES[name]
                if s == "int4-g128" and shape[1] % 128:  # 576 columns: g128 does not divide, use g64
                    skipped += 1
                    s = "int4-g64"
                f = Q.make_qformat(quantize_rtn(w, s))
                if isinstance(f, Q.Q4DenseFormat):
                    group = f.group  # the chain takes one group; mixed g128/g64 runs per layer below
                ws.append(f.codes)
                scales.append(f.scale)
                if getattr(f, "offset", None) is not None:
                    offsets.append(f.offset)
            nbytes += sum(t.numel() * t.element_size() for t in [ws[-1]] + ([scales[-1]] if scales else []))
            if offsets and len(offsets) == len(ws):
                nbytes += offsets[-1].numel() * offsets[-1].element_size()
    return {"weights": ws, "scales": scales, "offsets": offsets, "group": group, "bytes": nbytes, "mixed": skipped}


def run_chain(c: dict, xs: list[torch.Tensor]) -> None:
    if c["mixed"]:  # g128 where it divides, g64 elsewhere: run weight by weight with its own group
        for i, w in enumerate(c["weights"]):
            g = 2 * w.shape[1] // c["scales"][i].shape[1]
            torch.ops.sparseland.qmv_chain([w], [c["scales"][i]], [c["offsets"][i]], g, xs)
        return
    torch.ops.sparseland.qmv_chain(c["weights"], c["scales"], c["offsets"], c["group"], xs)


def bench_decode(layers: int, rounds: int, threads: int, base: dict) -> dict:
    torch.set_num_threads(threads)
    chains = {n: build_chain(n, layers, base) for n in DECODE}
    xs = [torch.randn(576), torch.randn(1536)]
    times: dict[str, list[float]] = {n: [] for n in DECODE}
    for n in DECODE:  # warm-up
        run_chain(chains[n], xs)
    for _ in range(rounds):
        for n in DECODE:
            t0 = time.perf_counter()
            run_chain(chains[n], xs)
            times[n].append(time.perf_counter() - t0)
    res = {}
    for n in DECODE:
        med = statistics.median(times[n])
        ratios = [a / b for a, b in zip(times["dense_fp32"], times[n], strict=True)]
        res[n] = {
            "us_per_pass": med * 1e6,
            "best_us": min(times[n]) * 1e6,
            "speedup_vs_fp32": statistics.median(ratios),
            "weight_mb": chains[n]["bytes"] / 1e6,
            "gb_per_s": chains[n]["bytes"] / med / 1e9,
            "note": "g64 on the 576-column layers (128 does not divide 576)" if chains[n]["mixed"] else "",
        }
    return res


def bench_prefill(rounds: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for out, inp in [(1536, 576), (576, 1536)]:
        w = torch.randn(out, inp) * 0.02
        fmts = {n: Q.make_qformat(quantize_rtn(w, SCHEMES[n])) for n in ("q4_g32_asym", "q4_g32_sym", "q8")}
        for B in (64, 512):
            x = torch.randn(B, inp)
            fns = {"torch_linear_fp32": lambda x=x, w=w: torch.nn.functional.linear(x, w)}
            for n, f in fmts.items():
                fns[n] = lambda x=x, f=f: f.matmul(x)
            times: dict[str, list[float]] = {n: [] for n in fns}
            for fn in fns.values():
                fn()
            for _ in range(rounds):
                for n, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
            for n in fns:
                ratios = [a / b for a, b in zip(times["torch_linear_fp32"], times[n], strict=True)]
                rows.append(
                    {
                        "shape": [out, inp],
                        "B": B,
                        "variant": n,
                        "threads": threads,
                        "ms": statistics.median(times[n]) * 1e3,
                        "speedup_vs_linear": statistics.median(ratios),
                    }
                )
    return rows


def markdown(data: dict) -> str:
    lines = [
        "# Dense quantized kernels (q4 / q8)",
        "",
        f"ISA path: `{data['isa']}`; {data['layers']} layers x {len(LAYER)} matvecs "
        f"({data['weights_m']:.1f}M weights) per decode pass; {data['rounds']} interleaved rounds, medians.",
        "Produced by `benchmarks/bench_qkernels.py`.",
        "",
        "## Decode: one vector through all layers",
        "",
        "| threads | variant | us / pass | speedup vs fp32 | weight MB | GB/s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, res in data["decode"].items():
        for n, r in res.items():
            lines.append(
                f"| {t} | {n} | {r['us_per_pass']:.0f} | {r['speedup_vs_fp32']:.2f} | {r['weight_mb']:.1f} "
                f"| {r['gb_per_s']:.1f} | {r['note']} |"
            )
    lines += [
        "",
        "## Prefill: (B, in) x W^T",
        "",
        "| threads | (out, in) | B | variant | ms | speedup vs torch linear fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["prefill"]:
        lines.append(
            f"| {r['threads']} | {tuple(r['shape'])} | {r['B']} | {r['variant']} | {r['ms']:.2f} "
            f"| {r['speedup_vs_linear']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prefill-rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not kernels.use_kernels():
        raise SystemExit("the C++ kernels are not built")
    g = torch.Generator().manual_seed(0)
    base = {s: torch.randn(*s, generator=g) * 0.02 for s in set(LAYER)}
    threads = [int(t) for t in args.threads.split(",")]
    data = {
        "isa": Q.quant_isa(),
        "layers": args.layers,
        "rounds": args.rounds,
        "weights_m": args.layers * sum(o * i for o, i in LAYER) / 1e6,
        "decode": {},
        "prefill": [],
    }
    for t in threads:
        data["decode"][str(t)] = bench_decode(args.layers, args.rounds, t, base)
        print(f"decode threads={t}:")
        for n, r in data["decode"][str(t)].items():
            print(f"  {n:14s} {r['us_per_pass']:8.0f} us  x{r['speedup_vs_fp32']:.2f}  {r['gb_per_s']:.1f} GB/s")
    for t in threads:
        data["prefill"] += bench_prefill(args.prefill_rounds, t)
    for r in data["prefill"]:
        print(r)
    write_results(args.out, "qkernels", data, markdown(data))


if __name__ == "__main__":
    main()
