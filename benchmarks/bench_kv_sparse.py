"""Mustafar-style sparse KV cache vs float32 (and int8) in the lean loop -> benchmarks/results/kv_sparse.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_kv_sparse.py --kv-dtypes float32,sparse:0.5,sparse:0.3

Protocol: SmolLM2-135M float32, batch 1, ``--threads`` torch threads (default 1).

* Cache bytes at ``--bytes-ctx`` positions (default 8192), computed from the formats (float32:
  2 * L * KVH * T * D * 4; int8: 2 * L * KVH * T * (D + 4); sparse at keep: 2 * L * KVH * T *
  (ceil(D / 8) + 4 * ceil(keep * D))) and checked against ``LeanDecoder(...).kv_cache_bytes()`` of an
  empty decoder of that length. Not timed.
* Needle accuracy: the same samples as benchmarks/bench_kv_int8.py, ``generate_samples(tok,
  lengths=[--needle-length], tasks, --samples, seed 0)``, and ``evaluate_longctx(..., kv_dtype=...,
  kv_keep=...)`` per KV cache (greedy, each task's own token budget; RULER string_match_all). float32 and
  int8 decode on the fused C++ step; sparse is the Python reference step (it rebuilds the dense cache
  every step), so its seconds are not a speed figure.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from sparseland.data import generate_samples
from sparseland.evaluate import evaluate_longctx
from sparseland.evaluate.longctx import format_table
from sparseland.io import write_results
from sparseland.models import load_model
from sparseland.models.loader import model_context_length
from sparseland.runtime.generate import LeanDecoder, kv_keep_count


def parse_kv(spec: str) -> tuple[str, float]:
    """'float32' | 'int8' | 'sparse:0.5' -> (kv_dtype, kv_keep)."""
    name, _, keep = spec.partition(":")
    if name not in ("float32", "int8", "sparse") or (name == "sparse") != bool(keep):
        raise SystemExit(f"bad --kv-dtypes entry {spec!r}: use float32, int8 or sparse:KEEP")
    return name, float(keep) if keep else 0.5


def format_bytes(dtype: str, keep: float, L: int, KVH: int, T: int, D: int) -> int:
    per = {"float32": 4 * D, "int8": D + 4}.get(dtype)
    if per is None:
        per = (D + 7) // 8 + 4 * kv_keep_count(keep, D)
    return 2 * L * KVH * T * per


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-dtypes", default="float32,sparse:0.5,sparse:0.3", help="comma-separated; first is the base")
    p.add_argument("--bytes-ctx", type=int, default=8192)
    p.add_argument("--needle-length", type=int, default=2048)
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    specs = [s.strip() for s in args.kv_dtypes.split(",") if s.strip()]
    kvs = {s: parse_kv(s) for s in specs}
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    L, KVH = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bytes_, ratio = {}, {}
    for s, (d, keep) in kvs.items():
        bytes_[s] = format_bytes(d, keep, L, KVH, args.bytes_ctx, D)
        measured = LeanDecoder(model, args.bytes_ctx, kv_dtype=d, kv_keep=keep).kv_cache_bytes()
        if measured != bytes_[s]:
            raise SystemExit(f"{s}: kv_cache_bytes() {measured} != the format's {bytes_[s]}")
        ratio[s] = bytes_[s] / format_bytes("float32", 1.0, L, KVH, args.bytes_ctx, D)
    samples = generate_samples(
        tok, [args.needle_length], args.tasks, args.samples, 0, None, model_context_length(model), progress=False
    )
    res, secs = {}, {}
    for s, (d, keep) in kvs.items():
        t0 = time.perf_counter()
        res[s] = evaluate_longctx(model, tok, samples, label=f"kv {s}", kv_dtype=d, kv_keep=keep, progress=False)
        secs[s] = time.perf_counter() - t0
        print(f"needle {s}: {res[s].accuracy():.1f}% in {secs[s]:.0f} s", flush=True)
    base = specs[0]
    same = {
        s: sum(a.output == b.output for a, b in zip(res[base].samples, res[s].samples, strict=True)) / len(samples)
        for s in specs
    }
    out = {
        "command": "python " + shlex.join(["benchmarks/bench_kv_sparse.py", *sys.argv[1:]]),
        "model": "smollm2-135m",
        "threads": args.threads,
        "shape": {"layers": L, "kv_heads": KVH, "head_dim": D},
        "kv": {s: {"kv_dtype": d, "kv_keep": keep if d == "sparse" else None} for s, (d, keep) in kvs.items()},
        "cache_bytes": {"positions": args.bytes_ctx, "bytes": bytes_, "ratio_to_float32": ratio},
        "needle": {
            "length": args.needle_length,
            "tasks": list(args.tasks),
            "samples_per_task": args.samples,
            "accuracy": {s: res[s].accuracy() for s in specs},
            "accuracy_per_task": {s: {t: res[s].accuracy(t) for t in args.tasks} for s in specs},
            f"identical_outputs_to_{base}": same,
            "seconds": secs,
            "table": format_table([res[s] for s in specs]),
            "results": {s: res[s].to_dict() for s in specs},
        },
        "note": args.note,
    }
    write_results(args.out, "kv_sparse", out, markdown(out, specs, base))
    print(markdown(out, specs, base))
    return 0


def markdown(out: dict, specs: list[str], base: str) -> str:
    cb, n = out["cache_bytes"], out["needle"]
    sh = out["shape"]
    lines = [
        "# Mustafar-style sparse KV cache vs float32 (lean loop, SmolLM2-135M float32)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"{out['threads']} torch thread(s) on a shared 2-core machine; protocol in benchmarks/bench_kv_sparse.py. "
        "sparse = per-token magnitude pruning of K (after RoPE) and V to the top ceil(keep * head_dim) |x| per "
        "token and KV head, bitmap + packed float32 values (`prune_kv`), Python reference step.",
        "",
        f"## Cache bytes at {cb['positions']} positions (from the format; L={sh['layers']}, KVH={sh['kv_heads']}, "
        f"head_dim={sh['head_dim']})",
        "",
        "| KV cache | MiB | / float32 |",
        "|---|---|---|",
    ]
    for s in specs:
        lines.append(f"| {s} | {cb['bytes'][s] / 2**20:.1f} | {cb['ratio_to_float32'][s]:.3f} |")
    lines += [
        "",
        f"## Needle accuracy at {n['length']} tokens ({n['samples_per_task']} samples per task, same samples as "
        "bench_kv_int8.py)",
        "",
        "```",
        n["table"],
        "```",
        "",
        "| KV cache | mean accuracy % | vs " + base + " (points) | outputs identical to " + base + " | seconds |",
        "|---|---|---|---|---|",
    ]
    acc = n["accuracy"]
    for s in specs:
        lines.append(
            f"| {s} | {acc[s]:.1f} | {acc[s] - acc[base]:+.1f} | "
            f"{100 * n[f'identical_outputs_to_{base}'][s]:.0f}% | {n['seconds'][s]:.0f} |"
        )
    lines += ["", out["note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
