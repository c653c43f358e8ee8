"""MoE decode on the fused C++ step vs the Python step -> benchmarks/results/moe_fused.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_moe_fused.py [--layers 12] [--rounds 5]
        [--formats fp32,bf16,q4]

Protocol: a random float32 Mixtral-shaped model built offline from a transformers config (hidden 512,
8 heads of 64, 2 KV heads, ``--experts`` experts of width 1024, top-2 routing, vocab 8192, ``--layers``
blocks; the same seed for every format). For each expert format in ``--formats`` (fp32: transformers'
3-D expert weights as they are; bf16: every Linear and expert projection as bf16 values; q4: the expert
projections as int4-g32 round-to-nearest, the other Linears bf16), a fresh model in that format decodes
the same prompt greedily with the lean loop (``greedy_generate``), fused step on and off, alternating
within each round; medians of per-token times. Reported: tok/s of each path, the fused/Python ratio,
the path that ran, whether the two paths' tokens are equal, and the weight bytes read per token
(attention, routers, the top-k experts' share of the expert bytes, lm_head).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sparseland, not an installed one
from sparseland.io import write_text_atomic  # noqa: E402
from sparseland.runtime import fastpath  # noqa: E402
from sparseland.runtime.experts import ExpertList, experts_to_sparse_runtime_  # noqa: E402
from sparseland.runtime.generate import greedy_generate  # noqa: E402
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(layers: int, experts: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=experts,
        num_experts_per_tok=2,
        vocab_size=8192,
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        pad_token_id=0,
    )
    return tf.AutoModelForCausalLM.from_config(cfg).float().eval()


def _bytes(m: torch.nn.Module) -> int:
    if isinstance(m, SparseLinear):
        return m.nbytes()
    return sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode token reads: every module's own weights, the experts' scaled by top_k / E."""
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            continue
        own = _bytes(m)
        if hasattr(m, "gate_up_proj"):  # transformers' 3-D experts
            own = own * k // E
        total += own
    for m in model.modules():  # ExpertList children were counted in full above: take back (1 - k/E)
        if isinstance(m, ExpertList):
            total -= sum(_bytes(c) for c in m.modules() if c is not m and not list(c.children())) * (E - k) // E
    return total


def run_pair(model, prompt, new_tokens: int, rounds: int) -> dict:
    per = {"fused": [], "python": []}
    toks, paths = {}, {}
    for name in per:  # warm-up
        with fastpath.use(enabled=name == "fused"):
            greedy_generate(model, prompt, 4, stop_at_eos=False)
    for _ in range(rounds):
        for name in per:
            with fastpath.use(enabled=name == "fused"):
                r = greedy_generate(model, prompt, new_tokens, stop_at_eos=False)
            per[name] += r.per_token_seconds
            toks[name], paths[name] = r.tokens, (r.path, r.path_reason)
    t = {k: statistics.median(v) for k, v in per.items()}
    return {
        "fused_tokens_per_s": 1 / t["fused"],
        "python_tokens_per_s": 1 / t["python"],
        "fused_over_python": t["python"] / t["fused"],
        "fused_path": paths["fused"],
        "python_path": paths["python"],
        "same_tokens": toks["fused"] == toks["python"],
        "weight_bytes_per_token": bytes_per_token(model),
    }


def convert(model, fmt: str) -> None:
    if fmt == "fp32":
        return
    to_sparse_runtime_(model, format="dense", value_dtype="bfloat16")
    experts_to_sparse_runtime_(model, format="dense" if fmt == "bf16" else fmt, value_dtype="bfloat16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--formats", default="fp32,bf16,q4")
    ap.add_argument("--out", default="moe_fused", help="results name under benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = torch.randint(3, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    t0, load = time.time(), [os.getloadavg()[0]]
    rows = []
    for fmt in args.formats.split(","):
        model = build(args.layers, args.experts)
        convert(model, fmt)
        rows.append({"experts": fmt} | run_pair(model, prompt, args.new_tokens, args.rounds))
        print(rows[-1], flush=True)
    out = {
        "command": "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "config": model.config.to_dict(),
        "rows": rows,
        "load_average_1min": load + [os.getloadavg()[0]],  # at the start and at the end
        "seconds": time.time() - t0,
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / f"{args.out}.json", json.dumps(out, indent=2, default=str))
    lines = [
        "# MoE (Mixtral-shaped) decode: fused C++ step vs Python step",
        "",
        f"Command: `{out['command']}` ({out['threads']} threads; {args.layers} layers, hidden 512, "
        f"{args.experts} experts of width 1024, top-2, vocab 8192, random weights; {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens x {args.rounds} rounds, fused and Python alternating in each round). "
        f"Load average (1 min) {out['load_average_1min'][0]:.1f} at the start, "
        f"{out['load_average_1min'][1]:.1f} at the end.",
        "",
        "| experts | weight MB / token | fused tok/s | Python tok/s | fused / Python | same tokens | path |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['weight_bytes_per_token'] / 1e6:.1f} | {r['fused_tokens_per_s']:.1f} | "
            f"{r['python_tokens_per_s']:.1f} | {r['fused_over_python']:.2f}x | {r['same_tokens']} | "
            f"{r['fused_path'][0]} / {r['python_path'][0]} |"
        )
    write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
