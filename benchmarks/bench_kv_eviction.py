"""KV-cache eviction in the lean loop (SnapKV, H2O vs dense) -> benchmarks/results/kv_eviction.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_kv_eviction.py [--length 8192 --keep 0.1]

Protocol: SmolLM2-135M float32, batch 1, ``--threads`` torch threads (default 1), the first ``--length``
tokens of the embedded text as the prompt.

* Each method gets its own copy of the model (one attention method per model) and its own
  ``LeanDecoder``; the prompt is prefilled once per method (timed once, reported as a rough figure).
  SnapKV and H2O keep ``--keep`` of the prompt per KV head and the lean loop frees the rest, so the
  KV-cache bytes after prefill (``LeanDecoder.kv_cache_bytes``: every buffer the caches hold, room
  for the new tokens included) are the memory the method saves.
* Decode: every decoder greedily decodes ``--decode-tokens`` tokens per round, the methods taking
  turns, over ``--rounds`` rounds (each continues its own sequence); tokens/s from the median
  per-token time, the first step of each round left out.
* Two dense baselines: the Python step (the same loop the eviction methods run, so the ratio is
  the eviction's own effect) and, when the C++ extension is built, the fused decode step (what a
  dense model gets by default; the eviction methods cannot use it).

Token agreement = the share of each method's generated tokens equal to dense's at the same step
(greedy; once a token differs the continuations diverge).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from sparseland.api import sparsify_
from sparseland.attention import H2OConfig, SnapKVConfig, measured_sparsity
from sparseland.data import load_corpus
from sparseland.io import write_results
from sparseland.models import load_model
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder

RESULTS = Path(__file__).parent / "results"


def _configs(keep: float, window: int, recent: float) -> dict:
    return {"snapkv": SnapKVConfig(keep=keep, window=window), "h2o": H2OConfig(keep=keep, recent=recent)}


class Run:
    """One method's model, decoder and measurements."""

    def __init__(self, name: str, model, ids: torch.Tensor, max_len: int, fused: bool) -> None:
        self.name, self.model, self.fused = name, model, fused
        self.dec = LeanDecoder(model, max_len)
        self.times: list[float] = []
        with fastpath.use(fused):
            t0 = time.perf_counter()
            self.logits = self.dec.step(ids)
            self.prefill_s = time.perf_counter() - t0
        self.bytes_after_prefill = self.dec.kv_cache_bytes()
        self.tokens = [int(self.logits.argmax())]

    def decode(self, n: int) -> None:
        with fastpath.use(self.fused):
            for i in range(n):
                t0 = time.perf_counter()
                self.tokens.append(int(self.dec.step(torch.tensor([[self.tokens[-1]]])).argmax()))
                if i > 0:  # the first step of a round is left out (warm-up of its code paths)
                    self.times.append(time.perf_counter() - t0)


def bench(model, ids: torch.Tensor, configs: dict, n_tokens: int, rounds: int) -> list[Run]:
    max_len = ids.shape[1] + rounds * n_tokens + 1
    runs = [Run("dense (Python step)", model, ids, max_len, fused=False)]
    if runs[0].dec.fast is not None:
        runs.append(Run("dense (fused step)", model, ids, max_len, fused=True))
    for name, cfg in configs.items():
        m = copy.deepcopy(model)
        sparsify_(m, cfg)
        runs.append(Run(name, m, ids, max_len, fused=False))
        print(f"prefill {name:8s} {runs[-1].prefill_s:7.2f}s  KV cache {runs[-1].bytes_after_prefill / 2**20:.1f} MiB")
    for r in range(rounds):
        for run in runs:
            run.decode(n_tokens)
            print(f"round {r + 1}/{rounds} {run.name:20s} {1 / statistics.median(run.times):6.2f} tok/s", flush=True)
    return runs


def _rows(runs: list[Run]) -> list[dict]:
    base, fused = runs[0], next((r for r in runs if r.fused), None)
    med = {r.name: statistics.median(r.times) for r in runs}
    rows = []
    for r in runs:
        same = sum(a == b for a, b in zip(r.tokens, base.tokens, strict=False)) / len(base.tokens)
        sp = measured_sparsity(r.model, "decode") if r.name in ("snapkv", "h2o") else 0.0
        rows.append(
            {
                "method": r.name,
                "kv_cache_bytes": r.bytes_after_prefill,
                "kv_cache_ratio": r.bytes_after_prefill / base.bytes_after_prefill,
                "prefill_seconds": r.prefill_s,
                "ms_per_token": med[r.name] * 1e3,
                "tokens_per_s": 1.0 / med[r.name],
                "speedup_vs_dense_python": med[base.name] / med[r.name],
                "speedup_vs_dense_fused": med[fused.name] / med[r.name] if fused else None,
                "decode_sparsity": sp,
                "token_agreement_with_dense": same,
                "per_token_seconds": r.times,
            }
        )
    return rows


def _markdown(res: dict) -> str:
    lines = [
        "# KV-cache eviction in the lean loop (SmolLM2-135M float32, batch 1)",
        "",
        f"Command: `{res['command']}`  ",
        f"Prompt: {res['length']} tokens of the embedded text; keep {res['keep']} of the prompt per KV head; "
        f"{res['threads']} torch thread(s); {res['decode_tokens']} decode tokens x {res['rounds']} interleaved "
        f"rounds; peak RSS {res['peak_rss_mib']:.0f} MiB (all models and caches together).",
        "KV cache = bytes the caches hold after prefill (room for the new tokens included). Speedups are "
        "median per-token times; measured on a shared 2-core machine: compare ratios within this file.",
        "",
        "| method | KV cache MiB | vs dense | prefill s | ms/token | tokens/s | speedup vs dense (Python) "
        "| vs dense (fused) | decode sparsity | tokens = dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fused = "-" if r["speedup_vs_dense_fused"] is None else f"{r['speedup_vs_dense_fused']:.2f}x"
        lines.append(
            f"| {r['method']} | {r['kv_cache_bytes'] / 2**20:.1f} | {r['kv_cache_ratio']:.3f} | "
            f"{r['prefill_seconds']:.1f} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.2f} | "
            f"{r['speedup_vs_dense_python']:.2f}x | {fused} | {r['decode_sparsity']:.3f} | "
            f"{r['token_agreement_with_dense']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (default: %(default)s)")
    ap.add_argument(
        "--keep", type=float, default=0.1, help="share of the prompt kept per KV head (default: %(default)s)"
    )
    ap.add_argument("--window", type=int, default=32, help="SnapKV observation window (default: %(default)s)")
    ap.add_argument("--recent", type=float, default=0.5, help="H2O's recent share of the budget (default: %(default)s)")
    ap.add_argument("--methods", nargs="*", default=["snapkv", "h2o"], help="eviction methods (default: both)")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps per round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--out", default="kv_eviction", help="results file stem (default: %(default)s)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where to write (default: benchmarks/results)")
    args = ap.parse_args()
    if args.decode_tokens < 2:
        ap.error(f"--decode-tokens={args.decode_tokens} must be at least 2 (the first step of a round is not timed)")
    configs = _configs(args.keep, args.window, args.recent)
    unknown = set(args.methods) - set(configs)
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}; choose from {sorted(configs)}")

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = load_corpus(tok).tokens[: args.length].view(1, -1)
    with torch.inference_mode():
        runs = bench(model, ids, {m: configs[m] for m in args.methods}, args.decode_tokens, args.rounds)
    res = {
        "command": "python " + " ".join(sys.argv),
        "length": ids.shape[1],
        "keep": args.keep,
        "window": args.window,
        "recent": args.recent,
        "threads": args.threads,
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": _rows(runs),
    }
    markdown = _markdown(res)
    write_results(args.results_dir, args.out, res, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
