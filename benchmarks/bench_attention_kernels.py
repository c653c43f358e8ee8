"""Sparse attention kernels vs torch on the embedded model's attention shape -> results/attention_kernels.{md,json}.

Prefill: our block-sparse kernel at several block densities vs torch's
``scaled_dot_product_attention(is_causal=True)`` (dense; GQA k/v expanded before timing) on the same
inputs. Decode: our dense and sparse decode kernels vs a plain torch matmul-softmax-matmul decode.
Variants are interleaved in rounds, the warm-up is left out, and the median round is reported.
Run under the shared lock:  flock /tmp/sparseland-heavy.lock python benchmarks/bench_attention_kernels.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparseland.io import write_text_atomic
from sparseland.runtime import attention as A

OUT = Path(__file__).parent / "results"
H, KVH, D, BS = 9, 3, 64, 64  # SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64; 64-token blocks


def sink_local_random_mask(T: int, density: float, seed: int) -> torch.Tensor:
    """Per head and query block i: the sink block 0, a local window of recent blocks (half the budget),
    and random earlier blocks for the rest; the budget is round(density * (i + 1)) blocks."""
    nb = (T + BS - 1) // BS
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(H, nb, nb, dtype=torch.bool)
    for h in range(H):
        for i in range(nb):
            budget = max(1, round(density * (i + 1)))
            local = max(1, budget // 2)
            mask[h, i, max(0, i - local + 1) : i + 1] = True
            mask[h, i, 0] = True
            rest = (~mask[h, i, : i + 1]).nonzero().flatten()
            extra = budget - int(mask[h, i].sum())
            if extra > 0 and len(rest):
                mask[h, i, rest[torch.randperm(len(rest), generator=g)[:extra]]] = True
    return mask


def timed(fn: Callable[[], object], reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def rounds_median(variants: dict[str, Callable[[], object]], rounds: int, reps: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant; one warm-up call each, then rounds interleaving the variants."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def prefill_rows(T: int, densities: list[float], rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(T)
    q, k, v = (
        torch.randn(H, T, D, generator=g),
        torch.randn(KVH, T, D, generator=g),
        torch.randn(KVH, T, D, generator=g),
    )
    # SDPA gets 4-D (1, H, T, D) inputs with GQA expanded: its fastest CPU path here (3-D inputs take the
    # math path, ~5x slower; enable_gqa=True was ~1.6x slower than expanded in a probe at T=2048).
    qe = q[None]
    ke, ve = k.repeat_interleave(H // KVH, 0)[None], v.repeat_interleave(H // KVH, 0)[None]
    masks = {d: (A.dense_block_mask(H, T, BS) if d >= 1.0 else sink_local_random_mask(T, d, seed=T)) for d in densities}
    variants: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True)[0]
    }
    for d, m in masks.items():
        variants[f"ours_{d:g}"] = lambda m=m: A.block_sparse_attention(q, k, v, m, BS)
    med = rounds_median(variants, rounds)
    # Correctness of what was timed: at full density our kernel equals SDPA.
    err = float((A.block_sparse_attention(q, k, v, A.dense_block_mask(H, T, BS), BS) - variants["sdpa"]()).abs().max())
    return [
        {
            "T": T,
            "target_density": d,
            "block_density": A.block_density(m, T, BS),
            "ours_s": med[f"ours_{d:g}"],
            "sdpa_s": med["sdpa"],
            "speedup_vs_sdpa": med["sdpa"] / med[f"ours_{d:g}"],
            "max_abs_err_dense_vs_sdpa": err,
        }
        for d, m in masks.items()
    ]


def decode_rows(S: int, fractions: list[int], rounds: int, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(S)
    q, kc, vc = torch.randn(H, D, generator=g), torch.randn(KVH, S, D, generator=g), torch.randn(KVH, S, D, generator=g)
    variants: dict[str, Callable[[], object]] = {
        "torch_dense": lambda: A.dense_decode_attention_reference(q, kc, vc),
        "ours_dense": lambda: A.dense_decode_attention(q, kc, vc),
    }
    page = 16  # Quest-style selection: whole pages of 16 consecutive positions
    for f in fractions:
        K = S // f
        tokens = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(H)])
        pages = torch.stack([torch.randperm(S // page, generator=g)[: K // page] for _ in range(H)])
        paged = (pages[:, :, None] * page + torch.arange(page)).reshape(H, -1)
        variants[f"ours_tokens_1/{f}"] = lambda i=tokens: A.sparse_decode_attention(q, kc, vc, i)
        variants[f"ours_pages_1/{f}"] = lambda i=paged: A.sparse_decode_attention(q, kc, vc, i)
        variants[f"torch_gather_pages_1/{f}"] = lambda i=paged: A.sparse_decode_attention_reference(q, kc, vc, i)
    med = rounds_median(variants, rounds, reps)
    base = med["torch_dense"]
    return [{"S": S, "variant": k, "us": 1e6 * t, "speedup_vs_torch_dense": base / t} for k, t in med.items()]


def render(res: dict) -> str:
    lines = [
        "# Sparse attention kernels",
        "",
        f"Shape of SmolLM2-135M attention: H={H}, KVH={KVH}, D={D}, block {BS}. Random inputs (timing does not "
        "depend on the values). Block masks: sink block + local window + random earlier blocks, budget "
        "round(density x (i+1)) blocks per query block i; `block density` is the measured fraction of causal "
        f"(query, key) pairs computed. Median of {res['rounds']} interleaved rounds after a warm-up. Load average "
        f"at start {res['loadavg']}; generated by `{res['command']}` in {res['seconds']:.0f} s.",
        "",
        "## Prefill: block-sparse attention vs torch SDPA (dense causal, same inputs)",
        "",
        "SDPA is called with (1, H, T, D) inputs and k, v expanded to H heads before timing (torch's CPU flash "
        "kernel; 3-D inputs fall back to the much slower math path). Our kernel reads the 3 KV heads directly.",
        "",
        "| threads | T | target density | block density | ours ms | SDPA ms | speedup vs SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["prefill"]:
        lines.append(
            f"| {r['threads']} | {r['T']} | {r['target_density']:g} | {r['block_density']:.3f} | "
            f"{1e3 * r['ours_s']:.0f} | {1e3 * r['sdpa_s']:.0f} | {r['speedup_vs_sdpa']:.2f} |"
        )
    lines += ["", "## Target (issue 6): prefill at 8k, 90% block sparsity, >= 5x faster than SDPA", ""]
    for r in res["prefill"]:
        if r["T"] == 8192 and r["target_density"] == 0.1:
            met = "met" if r["speedup_vs_sdpa"] >= 5 else "NOT met"
            lines.append(f"- {r['threads']} thread(s): {r['speedup_vs_sdpa']:.2f}x ({met})")
    lines += [
        "",
        "## Decode: one step at S cached positions",
        "",
        "`torch_dense` is q @ K^T -> softmax -> @ V with GQA by reshaping q (no copies); `ours_dense` is our "
        "decode kernel over all positions; `ours_tokens_1/f` attends S/f random positions per head, "
        "`ours_pages_1/f` S/f positions in random pages of 16 (Quest-style); `torch_gather_pages` is the "
        "gather + einsum reference on the paged indices.",
        "",
        "| threads | S | variant | us / step | speedup vs torch_dense |",
        "|---|---|---|---|---|",
    ]
    for r in res["decode"]:
        lines.append(
            f"| {r['threads']} | {r['S']} | {r['variant']} | {r['us']:.0f} | {r['speedup_vs_torch_dense']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-S", type=int, default=8192)
    ap.add_argument("--decode-reps", type=int, default=50, help="decode calls per timed round")
    ap.add_argument("--out", default=str(OUT / "attention_kernels"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res: dict = {
        "command": "python benchmarks/bench_attention_kernels.py",
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "prefill": [],
        "decode": [],
    }
    jobs = [(th, T) for th in args.threads for T in args.lengths]
    for th, T in tqdm(jobs, desc="prefill"):
        torch.set_num_threads(th)
        res["prefill"] += [{"threads": th, **r} for r in prefill_rows(T, args.densities, args.rounds)]
    for th in tqdm(args.threads, desc="decode"):
        torch.set_num_threads(th)
        rows = decode_rows(args.decode_S, [8, 16], 2 * args.rounds + 1, args.decode_reps)
        res["decode"] += [{"threads": th, **r} for r in rows]
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps(res, indent=2))
    write_text_atomic(out.with_suffix(".md"), render(res))
    print(render(res))


if __name__ == "__main__":
    main()
