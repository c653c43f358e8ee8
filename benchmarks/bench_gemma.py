"""Gemma 3 270M on the fused decode step next to a Llama of the same bytes per token ->
benchmarks/results/gemma.{md,json}.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_gemma.py [--rounds 5] [--new-tokens 32]
        [--prompt-tokens 64] [--threads 2] [--eval-windows 8] [--bf16]

Protocol: ``load_model("gemma3-270m")`` (the extra ``gemma``: 18 layers, hidden 640, 4 query heads and
1 KV head of 256, MLP 2048, vocab 262144 tied, sliding window 512 on five of six layers, q/k and
sandwich norms, GELU-tanh) in float32, and a random Llama built from a LlamaConfig of exactly those
widths (same Linears, same tied 262144 x 640 lm_head: the same weight bytes read per token, checked).
Both decode the same prompt (the start of the evaluation text) greedily with the lean loop
(``greedy_generate``) on the fused C++ step, interleaved over ``--rounds`` (``runtime.bench.time_decode``);
then both again with the fused step off (the Python step), in a second interleaved run. Reported: median
per-token time as tokens/s, the ratio to Llama's, weight bytes per token and the achieved GB/s, next to a
plain read of a 512 MB tensor (``read_bandwidth_gbs``) measured in the same run; the path each took; and
whether Gemma's lean-loop tokens equal transformers' ``generate``. ``--bf16``: both models also with
their Linears (lm_head included) as bf16 ``SparseLinear``s. Last, Gemma's perplexity on
``--eval-windows`` windows of 512 tokens of the evaluation part (``sparseland eval``'s protocol).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sparseland, not an installed one
from sparseland.io import write_text_atomic  # noqa: E402
from sparseland.runtime import fastpath  # noqa: E402
from sparseland.runtime.bench import read_bandwidth_gbs, time_decode  # noqa: E402
from sparseland.runtime.modules import to_sparse_runtime_, weight_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def llama_like(gemma: torch.nn.Module) -> torch.nn.Module:
    """A random Llama with Gemma's widths: the same Linears and lm_head, so the same bytes per token."""
    import transformers as tf

    g = gemma.config
    cfg = tf.LlamaConfig(
        hidden_size=g.hidden_size,
        intermediate_size=g.intermediate_size,
        num_hidden_layers=g.num_hidden_layers,
        num_attention_heads=g.num_attention_heads,
        num_key_value_heads=g.num_key_value_heads,
        head_dim=g.head_dim,
        vocab_size=g.vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).float().eval()


def bf16(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    to_sparse_runtime_(m, format="dense", value_dtype="bfloat16", lm_head_dtype="bfloat16")
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--eval-windows", type=int, default=8, help="perplexity windows of 512 (0: skip)")
    ap.add_argument("--bf16", action="store_true", help="also both models with bf16 Linears")
    ap.add_argument("--out", default="gemma", help="results file stem in benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparseland.data import load_corpus
    from sparseland.models import load_model
    from sparseland.runtime.generate import greedy_generate

    t0 = time.time()
    gemma, tok = load_model("gemma3-270m")
    load_s = time.time() - t0
    llama = llama_like(gemma)
    wb = {"gemma": weight_bytes(gemma), "llama": weight_bytes(llama)}
    assert wb["gemma"] == wb["llama"], wb
    corpus = load_corpus(tok)
    prompt = torch.cat([torch.tensor([tok.bos_token_id]), corpus.eval[: args.prompt_tokens - 1]]).reshape(1, -1)
    with torch.inference_mode():
        hf = gemma.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :].tolist()
    lean = greedy_generate(gemma, prompt, 16, stop_at_eos=False)
    models = {"llama": llama, "gemma3-270m": gemma}
    if args.bf16:
        models |= {"llama_bf16": bf16(llama), "gemma3-270m_bf16": bf16(gemma)}
    bw_before = read_bandwidth_gbs()
    rows = time_decode(models, prompt, args.new_tokens, args.rounds, base="llama")
    with fastpath.use(enabled=False):  # both on the Python step, in their own interleaved run
        py_models = {"llama_python": llama, "gemma3-270m_python": gemma}
        py = time_decode(py_models, prompt, args.new_tokens, args.rounds, base="llama_python")
    bw_after = read_bandwidth_gbs()
    ppl = None
    if args.eval_windows:
        from sparseland.evaluate import perplexity

        windows = corpus.evaluation(512, max_windows=args.eval_windows)
        ppl = perplexity(gemma, windows, seq_len=512, batch_size=1, progress=False).to_dict()
    out = {
        "command": "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "weight_bytes_per_token": wb["gemma"],
        "read_bandwidth_gbs": [bw_before, bw_after],
        "tokens_equal_hf_generate": lean.tokens == hf,
        "lean_path": [lean.path, lean.path_reason],
        "fused": rows,
        "python_step_run": py,
        "perplexity": ppl,
        "seconds": time.time() - t0,
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / f"{args.out}.json", json.dumps(out, indent=2))
    write_text_atomic(RESULTS / f"{args.out}.md", render(out, args))
    print(render(out, args))
    return 0


def render(out: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Gemma 3 270M: fused decode next to a Llama of the same bytes per token",
        "",
        f"Command: `{out['command']}` ({out['threads']} threads, {args.prompt_tokens}-token prompt of the "
        f"evaluation text, {args.new_tokens} new tokens x {args.rounds} rounds, interleaved). Weight bytes read "
        f"per token (fp32, tied lm_head counted once): {out['weight_bytes_per_token'] / 1e6:.0f} MB for both. "
        f"Plain read of 512 MB before / after: {out['read_bandwidth_gbs'][0]:.1f} / "
        f"{out['read_bandwidth_gbs'][1]:.1f} GB/s. Gemma's 16 greedy lean-loop tokens == transformers "
        f"`generate`: {out['tokens_equal_hf_generate']} (path {out['lean_path'][0]}).",
        "",
        "| model | path | decode tok/s | vs Llama | weight MB/token | achieved GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["fused"] + out["python_step_run"]:
        path = r["path"] + (f" ({r['path_reason']})" if r["path_reason"] else "")
        lines.append(
            f"| {r['variant']} | {path} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.3f}x | "
            f"{r['weight_bytes_per_token'] / 1e6:.0f} | {r['achieved_gbs']:.1f} |"
        )
    lines += ["", "The `_python` rows are a second interleaved run (fused step off); their ratio is to llama_python."]
    if out["perplexity"]:
        p = out["perplexity"]
        lines += ["", f"Perplexity of gemma3-270m (fp32), {args.eval_windows} windows of 512: {p['perplexity']:.2f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
