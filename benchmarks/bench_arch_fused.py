"""Fused decode step across architectures of the same shape -> benchmarks/results/arch_fused.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_arch_fused.py [--layers 30] [--rounds 5]
        [--families llama,qwen2,qwen3,gemma2,gemma3,phi3,olmo2]

Protocol: random float32 models built offline from transformers configs, all of SmolLM2-135M's shape
(hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, vocab 49152, ``--layers`` blocks, tied embeddings):
Llama; Qwen2 (q/k/v biases); Qwen3 (per-head q/k norms); Gemma 2 (sandwich (1 + w) norms, GELU-tanh,
soft-capping, a window of 512 on every other layer); Gemma 3 (q/k norms, a window of 512 on five of
six layers, two rotary tables); Phi-3 (fused qkv and gate_up); OLMo 2 (post-norms, q/k norms over all
heads). Llama is always in the run (the base of the ratios). Each decodes the same prompt greedily with
the lean loop (``greedy_generate``), the Qwen2 model also with the fused step off (its Python step, the
path it had before the fused step ran biases), interleaved over rounds (``runtime.bench.time_decode``).
Reported: median per-token time as tokens/s, the ratio to Llama's, the path each took (and why not
fused), and whether each one's tokens equal transformers' ``generate`` on the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sparseland, not an installed one
from sparseland.io import write_text_atomic  # noqa: E402
from sparseland.runtime import fastpath  # noqa: E402
from sparseland.runtime.bench import time_decode  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def build(kind: str, layers: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    gemma = dict(sliding_window=512, query_pre_attn_scalar=64)
    cfg, extra = {
        "llama": (tf.LlamaConfig, {}),
        "qwen2": (tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3Config, {}),
        "gemma2": (tf.Gemma2Config, gemma),
        "gemma3": (tf.Gemma3TextConfig, gemma),
        "phi3": (tf.Phi3Config, {"pad_token_id": 0}),
        "olmo2": (tf.Olmo2Config, {"pad_token_id": 0}),
    }[kind]
    model = tf.AutoModelForCausalLM.from_config(cfg(**SHAPE, **extra, num_hidden_layers=layers)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--families", default="llama,qwen2,qwen3", help="comma-separated model families")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    families = ["llama"] + [f for f in args.families.split(",") if f and f != "llama"]
    models = {k: build(k, args.layers) for k in families}
    prompt = torch.randint(3, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    hf = {}
    for k, m in models.items():
        out = m.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        hf[k] = out[0, prompt.shape[1] :].tolist()
    t0 = time.time()
    rows = time_decode(models, prompt, args.new_tokens, args.rounds, base="llama")
    with fastpath.use(enabled=False):  # the Python step, in its own interleaved run against Llama's
        py = time_decode(
            {"llama": models["llama"]} | {f"{k}_python": m for k, m in models.items() if k != "llama"},
            prompt,
            args.new_tokens,
            args.rounds,
            base="llama",
        )
    from sparseland.runtime.generate import greedy_generate

    for r in rows:
        r["tokens_equal_hf_generate"] = greedy_generate(models[r["variant"]], prompt, 8).tokens == hf[r["variant"]]
    out = {
        "command": "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "shape": SHAPE,
        "fused": rows,
        "python_step_run": py,
        "seconds": time.time() - t0,
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "arch_fused.json", json.dumps(out, indent=2))
    lines = [
        "# Fused decode step across architectures of the same shape (ratios to Llama)",
        "",
        f"Command: `{out['command']}` ({out['threads']} threads, {args.layers} layers of SmolLM2-135M's shape, "
        f"random weights, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens x {args.rounds} rounds, "
        "interleaved).",
        "",
        "| model | path | decode tok/s | vs Llama | tokens == transformers generate |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        path = r["path"] + (f" ({r['path_reason']})" if r["path_reason"] else "")
        lines.append(
            f"| {r['variant']} | {path} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.3f}x | "
            f"{r['tokens_equal_hf_generate']} |"
        )
    lines += [
        "",
        "Second run, fused step off for all (`SPARSELAND_NO_FASTPATH=1`):",
        "",
        "| model | path | decode tok/s | vs Llama (Python step) |",
        "|---|---|---|---|",
    ]
    for r in py:
        lines.append(f"| {r['variant']} | {r['path']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.3f}x |")
    write_text_atomic(RESULTS / "arch_fused.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
