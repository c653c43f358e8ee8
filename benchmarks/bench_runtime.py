"""Sparse CPU runtime benchmark on the embedded model -> benchmarks/results/runtime.{md,json}.

All numbers are measured side by side in one run (variants and decode paths interleaved in rounds,
warm-up left out), at each of ``--threads`` (default 1,2). Decode paths: ``fast`` = the fused C++ step
(fastpath.py), ``python`` = the lean loop's per-module Python step over the same kernels, and with
more than one thread ``fast_pm`` = the fused step waking torch's pool once per matvec.
Run under the shared lock:  flock /tmp/sparseland-heavy.lock python benchmarks/bench_runtime.py
Every variant but torch_linear_fp32 runs lm_head on our dense kernel in its Variant.lm_head_dtype (fp32 for
the fp32 variants, dense included), so the lm_head costs the same on both sides of an fp32 ratio.
Re-render the report with new Notes from the saved JSON (no measurement):
    python benchmarks/bench_runtime.py --rerender --notes notes.txt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sparseland.models import load_model
from sparseland.runtime import fastpath
from sparseland.runtime.bench import (
    DEFAULT_VARIANTS,
    build_models,
    kernel_ratios,
    magnitude_prune_,
    read_bandwidth_gbs,
    rss_mb,
)
from sparseland.runtime.checkpoint import checkpoint_bytes, save_sparse_checkpoint
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import model_bytes, weight_bytes

OUT = Path(__file__).parent / "results"
QUICK = ("dense_fp32", "dense_bf16", "unstructured50_fp32", "2:4_fp32", "unstructured70_fp32")


def checkpoint_ratio(model: torch.nn.Module) -> dict:
    """Disk bytes of a 50% magnitude-pruned sparse checkpoint vs the same writer on the dense model."""

    sparse = copy.deepcopy(model)
    magnitude_prune_(sparse, 0.5)
    with tempfile.TemporaryDirectory() as d:
        dense_b = checkpoint_bytes(save_sparse_checkpoint(model, None, Path(d) / "dense", metadata={}))
        sparse_b = checkpoint_bytes(save_sparse_checkpoint(sparse, None, Path(d) / "sparse", metadata={}))
    return {"dense_bytes": dense_b, "sparse50_bytes": sparse_b, "ratio": sparse_b / dense_b}


PATHS = {"fast": ("0", "region"), "python": ("1", "region"), "fast_pm": ("0", "per_matvec")}


@contextlib.contextmanager
def decode_path(path: str) -> Iterator[None]:
    """Run the lean loop on one decode path (set through the env vars fastpath.py reads)."""
    no_fast, mode = PATHS[path]
    with fastpath.use(enabled=no_fast == "0", mode=mode):
        yield


def time_paths(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int, paths: list[str]) -> list[dict]:
    """Greedy decode with every (model, path), interleaved over ``rounds``; medians of per-token times.
    Speedups are over the first model on the same path."""
    per_tok: dict[tuple, list[float]] = {(n, p): [] for n in models for p in paths}
    prefill: dict[tuple, list[float]] = {k: [] for k in per_tok}
    tokens: dict[tuple, list[int]] = {}
    for n, p in per_tok:  # warm-up
        with decode_path(p):
            greedy_generate(models[n], prompt, 4, stop_at_eos=False)
    for _ in range(rounds):
        for n, m in models.items():
            for p in paths:
                with decode_path(p):
                    r = greedy_generate(m, prompt, new_tokens, stop_at_eos=False)
                per_tok[(n, p)] += r.per_token_seconds
                prefill[(n, p)].append(r.prefill_seconds)
                tokens[(n, p)] = r.tokens
    t = {k: statistics.median(v) for k, v in per_tok.items()}
    base = next(iter(models))
    rows = []
    for n, m in models.items():
        wb = weight_bytes(m)
        with decode_path("fast"):
            eligible = LeanDecoder(m, 2).fast is not None
        row = {
            "variant": n,
            "fast_eligible": eligible,
            "weight_bytes_per_token": wb,
            "model_bytes": model_bytes(m),
            "prefill_tokens_per_s": prompt.shape[1] / statistics.median(prefill[(n, "python")]),
            "same_tokens_as_base": tokens[(n, "fast")] == tokens[(base, "fast")],
            "fast_tokens_equal_python": tokens[(n, "fast")] == tokens[(n, "python")],
        }
        for p in paths:
            row[f"{p}_tokens_per_s"] = 1 / t[(n, p)]
            row[f"{p}_speedup"] = t[(base, p)] / t[(n, p)]
            row[f"{p}_gbs"] = wb / t[(n, p)] / 1e9
        row["fast_vs_python"] = t[(n, "python")] / t[(n, "fast")]
        rows.append(row)
    return rows


@torch.inference_mode()
def profile_fast(models: dict, prompt: torch.Tensor, reps: int = 20) -> list[dict]:
    """Where a fast token's time goes: the fused C++ step (all blocks) vs final norm + lm_head (Python),
    each with its bytes, at position len(prompt)."""
    rows = []
    for n, m in models.items():
        with decode_path("fast"):
            dec = LeanDecoder(m, prompt.shape[1] + reps + 8)
        if dec.fast is None:
            continue
        dec.step(prompt)
        h = dec.base.embed_tokens(torch.tensor([[5]]))
        cos, sin = dec.base.rotary_emb(h, torch.tensor([[dec.pos]]))
        blocks, head = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = dec.fast(h, cos, sin, dec.pos)
            t1 = time.perf_counter()
            m.lm_head(dec.base.norm(out))
            t2 = time.perf_counter()
            blocks.append(t1 - t0)
            head.append(t2 - t1)
        tb, th = statistics.median(blocks), statistics.median(head)
        wb_blocks = weight_bytes(m, include_lm_head=False)
        wb_head = weight_bytes(m) - wb_blocks
        rows.append(
            {
                "variant": n,
                "blocks_ms": tb * 1e3,
                "blocks_gbs": wb_blocks / tb / 1e9,
                "lm_head_ms": th * 1e3,
                "lm_head_gbs": wb_head / th / 1e9,
            }
        )
    return rows


def targets(run: dict, res: dict) -> list[tuple[str, float, float, str]]:
    """(what, measured, target, unit) rows for one thread count, on the fast path."""
    d = {r["variant"]: r for r in run["decode"]}
    bw = run["read_bandwidth_gbs"]
    mlp = [k for k in run["kernels"] if k["shape"] in ("1536x576", "576x1536")]
    act = min(k["actsparse50_fp32_speedup"] for k in mlp)
    lin = res["linear_bytes_ratio_50"]
    return [
        ("dense fp32 decode, share of the bandwidth limit", d["dense_fp32"]["fast_gbs"] / bw, 0.70, "x"),
        ("50% unstructured fp32 decode vs dense fp32", d["unstructured50_fp32"]["fast_speedup"], 1.6, "x"),
        ("2:4 fp32 decode vs dense fp32", d["2:4_fp32"]["fast_speedup"], 1.6, "x"),
        ("70% unstructured fp32 decode vs dense fp32", d["unstructured70_fp32"]["fast_speedup"], 2.3, "x"),
        ("bf16 dense decode vs fp32 dense", d["dense_bf16"]["fast_speedup"], 1.7, "x"),
        ("activation-sparse matvec, 50% zero inputs, MLP shapes (min)", act, 1.6, "x"),
        ("Linear weight bytes at 50% unstructured vs dense", lin, 0.6, "<="),
    ] + (
        [("checkpoint file at 50% unstructured vs dense", res["checkpoint"]["ratio"], 0.6, "<=")]
        if res["checkpoint"]
        else []
    )


def render_run(run: dict, res: dict) -> list[str]:
    n, bw = run["threads"], run["read_bandwidth_gbs"]
    paths = run["paths"]
    lines = [
        f"## {n} thread{'s' if n > 1 else ''} (read bandwidth {bw:.1f} GB/s, measured in this run)",
        "",
        "### Decode (our lean loop, greedy): fused C++ step vs the Python step, speedups vs dense fp32 on the "
        "same path",
        "",
        "| variant | "
        + " | ".join(f"{p} tok/s" for p in paths)
        + " | fast vs python | speedup (fast) | speedup (python) | weight MB/token | GB/s (fast) | % of bw "
        "| prefill tok/s | model MB | fast tokens == python | same tokens as dense_fp32 |",
        "|---" * (len(paths) + 10) + "|",
    ]
    for r in run["decode"]:
        fast = "fast" if r["fast_eligible"] else "fast (ineligible: Python path)"
        lines.append(
            f"| {r['variant']} | "
            + " | ".join(f"{r[f'{p}_tokens_per_s']:.1f}" for p in paths)
            + f" | {r['fast_vs_python']:.2f} | {r['fast_speedup']:.2f} | {r['python_speedup']:.2f} | "
            f"{r['weight_bytes_per_token'] / 1e6:.0f} | {r['fast_gbs']:.1f} | {100 * r['fast_gbs'] / bw:.0f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['model_bytes'] / 1e6:.0f} | {r['fast_tokens_equal_python']} | "
            f"{r['same_tokens_as_base']} |" + ("" if r["fast_eligible"] else f" {fast}")
        )
    lines += [
        "",
        "### Where a fast token's time goes (fused step = all decoder blocks; lm_head + final norm in Python)",
        "",
        "| variant | blocks ms | blocks GB/s | lm_head ms | lm_head GB/s |",
        "|---|---|---|---|---|",
    ]
    for r in run["profile"]:
        lines.append(
            f"| {r['variant']} | {r['blocks_ms']:.2f} | {r['blocks_gbs']:.1f} | {r['lm_head_ms']:.2f} | "
            f"{r['lm_head_gbs']:.1f} |"
        )
    lines += ["", "### Kernels: speedup over our dense fp32 matvec per layer shape (30 distinct weights)", ""]
    keys = [k for k in run["kernels"][0] if k.endswith("_speedup")]
    lines.append(
        "| shape (out x in) | dense fp32 GB/s | " + " | ".join(k.removesuffix("_speedup") for k in keys) + " |"
    )
    lines.append("|---" * (len(keys) + 2) + "|")
    for r in run["kernels"]:
        lines.append(f"| {r['shape']} | {r['dense_fp32_gbs']:.1f} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    lines += ["", f"### Targets, {n} thread{'s' if n > 1 else ''} (fast path)", ""]
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for what, got, goal, unit in targets(run, res):
        met = got <= goal if unit == "<=" else got >= goal
        lines.append(f"| {what} | {got:.2f} | {'<=' if unit == '<=' else '>='} {goal} | {'yes' if met else 'NO'} |")
    return lines + [""]


def render(res: dict) -> str:
    lines = [
        "# Sparse CPU runtime benchmark",
        "",
        f"Model {res['model']}, threads {', '.join(str(r['threads']) for r in res['runs'])}, "
        f"{res['new_tokens']} new tokens x {res['rounds']} rounds after a {res['prompt_tokens']}-token prompt; "
        f"peak RSS {res['rss_mb']:.0f} MB; load average at start {res['loadavg']}. Generated by "
        f"`benchmarks/bench_runtime.py` in {res['seconds']:.0f} s. Paths: fast = fused C++ decode step "
        "(one call for all layers), python = the lean loop's per-module step over the same kernels, "
        "fast_pm = fused step with a pool wake-up per matvec instead of one OpenMP region per token.",
        "",
    ]
    for run in res["runs"]:
        lines += render_run(run, res)
    lm = res["lm_head_bound"]
    lines += [
        "## The dense lm_head bounds end-to-end speedups",
        "",
        f"lm_head (tied to the embeddings, {lm['lm_head_mb']:.0f} MB in fp32) is read every token and "
        f"stays dense; "
        f"the other Linear weights are {lm['blocks_mb']:.0f} MB. Even with free decoding, 50% unstructured "
        f"(bitmask, 0.53x bytes) can reach at most {lm['bound_50_fp32']:.2f}x and 70% at most "
        f"{lm['bound_70_fp32']:.2f}x with an fp32 lm_head; with a bf16 lm_head on both sides the bounds are "
        f"{lm['bound_50_bf16_head']:.2f}x and {lm['bound_70_bf16_head']:.2f}x.",
        "",
    ]
    if res.get("notes"):
        lines += ["## Notes", "", res["notes"], ""]
    return "\n".join(lines)


def lm_head_bound(model: torch.nn.Module) -> dict:
    head = model.lm_head.weight.numel() * 4
    blocks = weight_bytes(model, include_lm_head=False)

    def bound(density: float, head_b: float) -> float:
        return (blocks + head_b) / (blocks * (1 / 32 + density) + head_b)

    return {
        "lm_head_mb": head / 1e6,
        "blocks_mb": blocks / 1e6,
        "bound_50_fp32": bound(0.5, head),
        "bound_70_fp32": bound(0.3, head),
        "bound_50_bf16_head": bound(0.5, head / 2),
        "bound_70_bf16_head": bound(0.3, head / 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in turn")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(OUT / "runtime"))
    ap.add_argument("--notes", default=None, help="a text file whose content goes into the report's Notes")
    ap.add_argument("--quick", action="store_true", help="fp32 variants only, no checkpoint sizes (~30 s)")
    ap.add_argument("--rerender", action="store_true", help="rewrite the .md from the saved .json (with --notes)")
    args = ap.parse_args()
    if args.rerender:
        out = Path(args.out)
        res = json.loads(out.with_suffix(".json").read_text())
        if args.notes:
            res["notes"] = Path(args.notes).read_text().strip()
            out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(render(res))
        return
    threads = [int(t) for t in str(args.threads).split(",")]
    t0 = time.perf_counter()
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    model, _ = load_model(args.model)
    high = min(1000, model.config.vocab_size)
    prompt = torch.randint(3, high, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    res: dict = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "rounds": args.rounds,
        "loadavg": " ".join(loadavg),
    }
    variants = [v for v in DEFAULT_VARIANTS if not args.quick or v.name in QUICK]
    models = build_models(model, variants, include_torch=not args.quick)
    res["runs"] = []
    for n in threads:
        torch.set_num_threads(n)
        paths = ["fast", "python"] + (["fast_pm"] if n > 1 else [])
        run = {"threads": n, "paths": paths, "read_bandwidth_gbs": read_bandwidth_gbs()}
        run["decode"] = time_paths(models, prompt, args.new_tokens, args.rounds, paths)
        run["profile"] = profile_fast(models, prompt)
        run["read_bandwidth_gbs_after"] = read_bandwidth_gbs()
        run["kernels"] = kernel_ratios(rounds=2 * args.rounds + 1)
        res["runs"].append(run)
    d = {r["variant"]: r for r in res["runs"][0]["decode"]}
    head = model.lm_head.weight.numel() * 4
    res["linear_bytes_ratio_50"] = (d["unstructured50_fp32"]["weight_bytes_per_token"] - head) / (
        d["dense_fp32"]["weight_bytes_per_token"] - head
    )
    res["model_bytes_ratio_50"] = d["unstructured50_fp32"]["model_bytes"] / d["dense_fp32"]["model_bytes"]
    res["checkpoint"] = None if args.quick else checkpoint_ratio(model)
    res["lm_head_bound"] = lm_head_bound(model)
    res["rss_mb"] = rss_mb()
    res["seconds"] = time.perf_counter() - t0
    res["notes"] = Path(args.notes).read_text().strip() if args.notes else None
    for run in res["runs"]:
        run["targets"] = [{"what": w, "measured": g, "goal": t, "kind": u} for w, g, t, u in targets(run, res)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
