"""int8 KV cache vs float32 in the lean loop -> benchmarks/results/kv_int8.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_kv_int8.py [--ctx 8192 --needle-length 2048]

Protocol: SmolLM2-135M float32, batch 1, ``--threads`` torch threads (default 2).

* Memory and speed at ``--ctx`` prompt tokens (the embedded text): one ``LeanDecoder`` per KV dtype
  (``kv_dtype="float32"`` and ``"int8"``), each prefilled once (the Python step, timed once, a rough
  figure); ``kv_cache_bytes()`` after prefill (int8: codes + float32 scales; both include room for
  the decoded tokens). Decode on the fused C++ step: ``--decode-tokens`` greedy tokens per decoder per
  round, the two taking turns (order alternating) over ``--rounds`` rounds, each continuing its own
  sequence; tok/s from the median per-token time, the first step of each round left out.
  Token agreement: int8's greedy tokens equal float32's at the same step, over the first round.
* Needle accuracy: ``generate_samples(tok, lengths=[--needle-length], tasks, --samples)`` and
  ``evaluate_longctx(..., kv_dtype=...)`` for both KV dtypes on the same samples (greedy, each task's
  own token budget; RULER string_match_all).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from sparseland.data import generate_samples
from sparseland.data.text import embedded_text
from sparseland.evaluate import evaluate_longctx
from sparseland.evaluate.longctx import format_table
from sparseland.io import write_results
from sparseland.models import load_model
from sparseland.models.loader import model_context_length
from sparseland.runtime.generate import LeanDecoder

DTYPES = ("float32", "int8")


def speed(model, tok, args) -> dict:
    ids = tok(embedded_text(), return_tensors="pt")["input_ids"][:, : args.ctx]
    if ids.shape[1] < args.ctx:
        sys.exit(f"the embedded text has only {ids.shape[1]} tokens; pass a smaller --ctx")
    max_len = args.ctx + args.rounds * args.decode_tokens + 1
    decs, last, prefill_s = {}, {}, {}
    for d in DTYPES:
        dec = LeanDecoder(model, max_len, kv_dtype=d)
        if dec.fast is None:
            sys.exit(f"the fused step does not run with kv_dtype={d}; build the extension")
        t0 = time.perf_counter()
        last[d] = int(dec.step(ids).argmax())
        prefill_s[d] = time.perf_counter() - t0
        decs[d] = dec
        print(f"{d}: prefill {args.ctx} tokens {prefill_s[d]:.1f} s", flush=True)
    bytes_ = {d: decs[d].kv_cache_bytes() for d in DTYPES}
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    tokens: dict[str, list[int]] = {d: [last[d]] for d in DTYPES}
    for r in range(args.rounds):
        for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            dec = decs[d]
            for j in range(args.decode_tokens):
                t0 = time.perf_counter()
                nxt = int(dec.step(torch.tensor([[tokens[d][-1]]])).argmax())
                if j > 0:
                    times[d].append(time.perf_counter() - t0)
                tokens[d].append(nxt)
        print(
            f"round {r}: " + ", ".join(f"{d} {1 / statistics.median(times[d]):.2f} tok/s" for d in DTYPES), flush=True
        )
    tps = {d: 1 / statistics.median(times[d]) for d in DTYPES}
    n = args.decode_tokens + 1  # the first round (and the token after prefill)
    agree = sum(a == b for a, b in zip(tokens["float32"][:n], tokens["int8"][:n], strict=True)) / n
    return {
        "prompt_tokens": args.ctx,
        "cache_positions": max_len,
        "kv_cache_bytes": bytes_,
        "kv_cache_ratio": bytes_["int8"] / bytes_["float32"],
        "prefill_seconds": prefill_s,
        "decode_tokens_per_s": tps,
        "decode_speedup_int8": tps["int8"] / tps["float32"],
        "per_token_seconds": times,
        "token_agreement_first_round": agree,
        "tokens": tokens,
    }


def needle(model, tok, args) -> dict:
    samples = generate_samples(
        tok, [args.needle_length], args.tasks, args.samples, 0, None, model_context_length(model), progress=False
    )
    res = {}
    for d in DTYPES:
        t0 = time.perf_counter()
        res[d] = evaluate_longctx(model, tok, samples, label=f"kv {d}", kv_dtype=d, progress=False)
        print(f"needle {d}: {res[d].accuracy():.1f}% in {time.perf_counter() - t0:.0f} s", flush=True)
    same = sum(a.output == b.output for a, b in zip(res["float32"].samples, res["int8"].samples, strict=True)) / len(
        samples
    )
    return {
        "length": args.needle_length,
        "tasks": list(args.tasks),
        "samples_per_task": args.samples,
        "accuracy": {d: res[d].accuracy() for d in DTYPES},
        "accuracy_per_task": {d: {t: res[d].accuracy(t) for t in args.tasks} for d in DTYPES},
        "identical_outputs": same,
        "table": format_table([res[d] for d in DTYPES]),
        "results": {d: res[d].to_dict() for d in DTYPES},
    }


def markdown(out: dict) -> str:
    s, n = out["speed"], out["needle"]
    mb = {d: s["kv_cache_bytes"][d] / 2**20 for d in DTYPES}
    lines = [
        "# int8 KV cache vs float32 (lean loop, SmolLM2-135M float32)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"{out['threads']} torch threads on a shared 2-core machine (another benchmark was running); "
        "protocol in benchmarks/bench_kv_int8.py.",
        "",
        f"## Memory and decode speed at {s['prompt_tokens']} prompt tokens (fused C++ step)",
        "",
        "| KV cache | cache MiB | decode tok/s (median) | prefill s (Python step, once) |",
        "|---|---|---|---|",
    ]
    for d in DTYPES:
        lines.append(f"| {d} | {mb[d]:.1f} | {s['decode_tokens_per_s'][d]:.2f} | {s['prefill_seconds'][d]:.1f} |")
    lines += [
        "",
        f"- cache bytes int8 / float32: **{s['kv_cache_ratio']:.3f}** (target <= 0.3; head_dim 64: "
        "(64 + 4) / 256 = 0.266)",
        f"- decode speed int8 / float32: **{s['decode_speedup_int8']:.2f}x** ({out['rounds']} interleaved rounds of "
        f"{out['decode_tokens']} tokens, first step of each round left out)",
        f"- greedy tokens equal to float32's over the first round: {100 * s['token_agreement_first_round']:.0f}%",
        "",
        f"## Needle accuracy at {n['length']} tokens ({n['samples_per_task']} samples per task, same samples)",
        "",
        "```",
        n["table"],
        "```",
        "",
        f"- mean accuracy float32 {n['accuracy']['float32']:.1f}%, int8 {n['accuracy']['int8']:.1f}% "
        f"(difference {n['accuracy']['int8'] - n['accuracy']['float32']:+.1f} points; target within 2)",
        f"- identical outputs: {100 * n['identical_outputs']:.0f}% of samples",
        "",
        out["note"],
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=8192, help="prompt tokens for memory and speed")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--needle-length", type=int, default=2048)
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    out = {
        "command": "python " + shlex.join(["benchmarks/bench_kv_int8.py", *sys.argv[1:]]),
        "model": "smollm2-135m",
        "threads": args.threads,
        "rounds": args.rounds,
        "decode_tokens": args.decode_tokens,
        "note": args.note,
    }
    out["speed"] = speed(model, tok, args)
    out["needle"] = needle(model, tok, args)
    write_results(args.out, "kv_int8", out, markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
