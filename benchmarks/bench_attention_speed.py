"""Sparse-attention speed in the lean loop -> benchmarks/results/attention_speed.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_attention_speed.py [--length 8192]

Protocol: SmolLM2-135M float32, batch 1, the first ``--length`` tokens of the embedded text.

* Prefill (``--prefill-threads``, default 2): end-to-end ``LeanDecoder.step`` over the whole prompt,
  dense (the loop's own SDPA) and each prefill method made with ``make_config(name, --sparsity)``;
  every method is warmed up on a short prompt, then dense and the methods run in turn, interleaved
  over ``--prefill-rounds`` rounds, so a load change on the shared machine hits all of them alike.
  Seconds = the median over rounds; speedup = the median over rounds of (dense seconds / method
  seconds) within the same round; the measured sparsity is the method's own count of skipped causal
  query-key pairs.
* Decode (``--decode-threads``, default 1 and 2): the prompt is prefilled once densely (not timed);
  then dense, Quest and TidalDecode each decode ``--decode-tokens`` tokens from the same cache position,
  interleaved over ``--rounds`` rounds; tokens/s from the median per-token time. Dense and the methods
  run the same per-layer Python step; dense on the fused C++ step is measured too, as the fastest dense
  path, and so is Quest inside the fused step (``--fused-decode``, with or without ``refine``).

The kernels used (C++ op or PyTorch reference) are recorded: ``ops.KERNELS`` and whether the runtime's
``torch.ops.sparseland`` ops are built.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sparseland.api import sparsify_
from sparseland.attention import attention_method, make_config, measured_sparsity, ops, remove
from sparseland.attention.configs import parse_method_spec
from sparseland.data import load_corpus
from sparseland.io import write_results
from sparseland.models import load_model
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder

RESULTS = Path(__file__).parent / "results"
PREFILL = ("streaming", "vertical_slash", "block_sparse", "flexprefill", "xattention")
DECODE = ("quest", "tidaldecode")
FUSED_DECODE = ("quest", "quest:page_size=8,refine=8", "quest:page_size=4,refine=4")
FUSED = "dense (fused step)"


def _kernel_info() -> dict:
    from sparseland.runtime import kernels

    kernels.use_kernels()  # loads sparseland.runtime._C, which registers torch.ops.sparseland.*
    built = [n for n in ("block_sparse_attention", "sparse_decode_attention") if hasattr(torch.ops.sparseland, n)]
    return {"ops_module": ops.KERNELS, "cpp_ops_built": built}


def _prefill_once(model, name: str, ids: torch.Tensor, sparsity: float) -> tuple[float, int, float]:
    """One timed prefill of ``ids`` with ``name`` (or dense): seconds, next token, measured sparsity."""
    remove(model)
    if name != "dense":
        sparsify_(model, make_config(name, sparsity))
    dec = LeanDecoder(model, ids.shape[1])
    t0 = time.perf_counter()
    tok = int(dec.step(ids).argmax())
    sec = time.perf_counter() - t0
    sp = 0.0 if name == "dense" else measured_sparsity(model, "prefill")
    return sec, tok, sp


def bench_prefill(model, ids: torch.Tensor, methods, sparsity: float, rounds: int) -> list[dict]:
    names = ("dense", *methods)
    for name in names:  # warm-up: first calls of each method's code paths and kernels
        _prefill_once(model, name, ids[:, :512], sparsity)
    secs: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, tuple[int, float]] = {}
    for r in range(rounds):
        for name in names:
            sec, tok, sp = _prefill_once(model, name, ids, sparsity)
            secs[name].append(sec)
            last[name] = (tok, sp)
            print(f"prefill round {r + 1}/{rounds} {name:15s} {sec:7.2f}s  sparsity {sp:.3f}", flush=True)
        for name in names:
            ratios[name].append(secs["dense"][-1] / secs[name][-1])
    remove(model)
    rows = []
    for name in names:
        tok, sp = last[name]
        rows.append(
            {
                "method": name,
                "seconds": statistics.median(secs[name]),
                "seconds_all": secs[name],
                "speedup": statistics.median(ratios[name]),
                "speedup_all": ratios[name],
                "sparsity": sp,
                "same_next_token": tok == last["dense"][0],
            }
        )
    return rows


def bench_decode(
    model, dec: LeanDecoder, ids: torch.Tensor, methods, fused_specs, sparsity: float, n_tokens: int, rounds: int
):
    """``dec`` holds the densely prefilled prompt ``ids``; every method decodes from that position.
    ``methods`` run on the Python step, ``fused_specs`` (``"quest:page_size=16,refine=4"``) on the
    fused C++ step, which is re-built for each with the method applied (it shares ``dec``'s cache)."""
    T = ids.shape[1]
    feed = ids[0, :n_tokens].tolist()
    # "dense" runs the same Python step as the methods; "dense (fused step)" is the fastest dense path
    runs = {"dense": (None, {}, False), FUSED: (None, {}, True)}
    runs.update({name: (name, {}, False) for name in methods})
    runs.update(
        {f"{spec} (fused step)": (*parse_method_spec(spec, flag="--fused-decode"), True) for spec in fused_specs}
    )
    times: dict[str, list[float]] = {label: [] for label in runs}
    sparsity_seen: dict[str, float] = {}
    for _ in range(rounds):
        for label, (name, overrides, fused) in runs.items():
            remove(model)
            if name is not None:
                sparsify_(model, make_config(name, sparsity, **overrides))
            dec.pos = T
            with fastpath.use(fused):
                if fused:  # packed for this method (Quest) or none; fresh page bounds
                    dec.fast = fastpath.build_fast_step(dec)
                    if dec.fast is None or not dec.fast.runs(attention_method(model)):
                        raise SystemExit(f"{label}: the fused step cannot run it")
                for i, t in enumerate(feed):
                    t0 = time.perf_counter()
                    dec.step(torch.tensor([[t]]))
                    if i > 0:  # the first step builds Quest's page bounds for the whole prompt
                        times[label].append(time.perf_counter() - t0)
            if name is not None:
                sparsity_seen[label] = measured_sparsity(model, "decode")
    remove(model)
    dense_med, fused_med = statistics.median(times["dense"]), statistics.median(times[FUSED])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "method": label,
                "ms_per_token": med * 1e3,
                "tokens_per_s": 1.0 / med,
                "speedup": dense_med / med,
                "speedup_vs_fused": fused_med / med,
                "sparsity": sparsity_seen.get(label, 0.0),
            }
        )
        print(
            f"decode {label:18s} {1 / med:6.2f} tok/s  x{dense_med / med:.2f}  x{fused_med / med:.2f} fused", flush=True
        )
    return rows


def _markdown(res: dict) -> str:
    lines = [
        "# Sparse attention speed (lean loop, SmolLM2-135M float32, batch 1)",
        "",
        f"Command: `{res['command']}`  ",
        f"Prompt: {res['length']} tokens of the embedded text; target sparsity {res['sparsity']}; "
        f"kernels: {res['kernels']}.",
        "Dense = the lean loop's own attention (SDPA, is_causal for a fresh prefill; grouped matmul in decode).",
        "Measured on a shared 2-core machine: compare ratios within this file, not absolute times across runs.",
        "",
    ]
    for threads, rows in res["prefill"].items():
        lines += [
            f"## Prefill, {threads} thread(s)",
            "",
            "| method | seconds (median) | speedup vs dense (median) | per round | measured sparsity "
            "| same next token |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
            f"{', '.join(f'{x:.2f}' for x in r['speedup_all'])} | {r['sparsity']:.3f} | {r['same_next_token']} |"
            for r in rows
        ]
        lines.append("")
    for threads, rows in res["decode"].items():
        lines += [
            f"## Decode at {res['length']} context, {threads} thread(s)",
            "",
            "| method | ms/token | tokens/s | speedup vs dense (same loop) | vs dense fused step | measured sparsity |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['speedup_vs_fused']:.2f}x | {r['sparsity']:.3f} |"
            for r in rows
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="target attention sparsity (default: %(default)s)")
    ap.add_argument("--prefill-threads", type=int, nargs="*", default=[2], help="torch threads for prefill")
    ap.add_argument("--decode-threads", type=int, nargs="*", default=[1, 2], help="torch threads for decode")
    ap.add_argument(
        "--prefill-methods", nargs="*", default=list(PREFILL), help="prefill methods (default: %(default)s)"
    )
    ap.add_argument("--prefill-rounds", type=int, default=3, help="interleaved prefill rounds (default: %(default)s)")
    ap.add_argument("--decode-tokens", type=int, default=12, help="decode steps per round (default: %(default)s)")
    ap.add_argument(
        "--fused-decode",
        nargs="*",
        default=list(FUSED_DECODE),
        metavar="SPEC",
        help="decode methods measured on the fused C++ step (Quest only), each with optional config fields "
        "(default: %(default)s)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="interleaved decode rounds (default: %(default)s)")
    ap.add_argument("--out", default="attention_speed", help="results file stem (default: %(default)s)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where to write (default: benchmarks/results)")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    ids = load_corpus(tok).tokens[: args.length].view(1, -1)
    res = {
        "command": "python " + " ".join(sys.argv),
        "length": ids.shape[1],
        "sparsity": args.sparsity,
        "prefill_rounds": args.prefill_rounds,
        "kernels": _kernel_info(),
        "prefill": {},
        "decode": {},
    }
    with torch.inference_mode():
        for n in args.prefill_threads:
            torch.set_num_threads(n)
            res["prefill"][str(n)] = bench_prefill(model, ids, args.prefill_methods, args.sparsity, args.prefill_rounds)
        if args.decode_threads:
            remove(model)
            dec = LeanDecoder(model, ids.shape[1] + args.decode_tokens + 1)
            dec.step(ids)  # one dense prefill shared by every decode measurement
        for n in args.decode_threads:
            torch.set_num_threads(n)
            rows = bench_decode(
                model, dec, ids, DECODE, args.fused_decode, args.sparsity, args.decode_tokens, args.rounds
            )
            res["decode"][str(n)] = rows
    markdown = _markdown(res)
    write_results(args.results_dir, args.out, res, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
