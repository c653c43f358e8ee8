"""``sparseland generate`` and ``sparseland bench``: the sparse runtime from the command line."""

from __future__ import annotations

import argparse
import json

import torch

from sparseland.cli import add_model_args, fraction, positive_int
from sparseland.errors import SparselandError

FORMAT_HELP = (
    "runtime weight format: auto (quantized formats for quantized layers; else N:M if exact, else bitmask), "
    "bitmask, 2:4, 4:8, dense, q4, q8, q4_nm, q4_bitmask (default: auto)"
)


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _generate_command(args: argparse.Namespace) -> int:
    from sparseland.models import load_model
    from sparseland.runtime.generate import greedy_generate
    from sparseland.runtime.modules import to_sparse_runtime_

    if not args.prompt.strip():
        raise SparselandError("--prompt is empty; pass some text to continue, e.g. --prompt 'Once upon a time'")
    _threads(args)
    model, tok = load_model(args.model)
    if tok is None:
        raise SparselandError(f"{args.model} has no tokenizer; save the checkpoint with one to use `generate`")
    report = None
    if args.sparse_runtime:
        report = to_sparse_runtime_(model, format=args.format, value_dtype=args.value_dtype, lm_head_dtype="float32")
    from sparseland.data.chat import chat_ids, has_chat_template

    chat = not args.raw and has_chat_template(tok)
    if args.system is not None and not chat:
        why = "--raw continues text as-is" if args.raw else f"{args.model}'s tokenizer has no chat template"
        raise SparselandError(f"--system needs the chat template ({why}); drop --system or --raw")
    ids = chat_ids(tok, args.prompt, args.system) if chat else tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise SparselandError(f"--prompt {args.prompt!r} gives no tokens with this tokenizer; pass some words")
    res = greedy_generate(model, ids, args.max_new_tokens, kv_dtype=args.kv_dtype)
    text = tok.decode(res.tokens, skip_special_tokens=True)
    out = {
        "model": args.model,
        "chat_template": chat,
        "sparse_runtime": bool(args.sparse_runtime),
        "kv_dtype": args.kv_dtype,
        "formats": report.formats if report else None,
        "text": text,
        "new_tokens": len(res.tokens),
        "prefill_tokens_per_s": res.prefill_tokens_per_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "path": res.path,
        "path_reason": res.path_reason,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(text if chat else args.prompt + text)
        print(
            f"-- {len(res.tokens)} tokens; prefill {res.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {res.decode_tokens_per_s:.1f} tok/s ({res.path} step"
            + (f": {res.path_reason}" if res.path_reason else "")
            + ")"
            + (f"; runtime formats {report.formats}" if report else "")
        )
    return 0


def _is_sparse(model: torch.nn.Module) -> bool:
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((w == 0).sum()) for w in ws)
    return zeros / max(1, sum(w.numel() for w in ws)) > 0.2


def _is_quantized(model: torch.nn.Module) -> bool:
    from sparseland.quant import quant_state

    return any(quant_state(m) is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


def _checkpoint_mb(spec: str) -> float | None:
    """Size of the weights file of a checkpoint directory or a .gguf file, else None."""
    from pathlib import Path

    p = Path(spec).expanduser()
    f = p / "model.safetensors" if p.is_dir() else p
    return f.stat().st_size / 1e6 if f.is_file() else None


def _bench_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``--pattern`` parsed as (N, M), None for none/unstructured; a bad value is a ``SparselandError``."""
    from sparseland.weights.config import parse_pattern

    return None if pattern is None else parse_pattern(pattern)


def _check_pattern_fits(model: torch.nn.Module, pattern: str, m: int) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head") and mod.in_features % m:
            raise SparselandError(
                f"--pattern {pattern}: {name} has {mod.in_features} input features, not a multiple of M={m}; "
                "use an M that divides them (e.g. 2:4) or omit --pattern"
            )


def _bench_command(args: argparse.Namespace) -> int:
    from sparseland.models import load_model
    from sparseland.runtime.bench import (
        Variant,
        build_variant,
        kernel_ratios,
        magnitude_prune_,
        read_bandwidth_gbs,
        rss_mb,
        time_decode,
    )

    pattern = _bench_pattern(args.pattern)
    _threads(args)
    model, tok = load_model(args.model)
    if pattern:
        _check_pattern_fits(model, args.pattern, pattern[1])
    args.pattern = args.pattern if pattern else None
    quantized = _is_quantized(model)
    sparse = model
    if args.prune_sparsity is not None or args.pattern:
        import copy

        sparse = copy.deepcopy(model)
        magnitude_prune_(sparse, args.prune_sparsity or 0.5, args.pattern)
    elif not _is_sparse(model) and not quantized:
        raise SparselandError(
            f"{args.model} is dense; pass --prune-sparsity 0.5 (and optionally --pattern 2:4) to bench a "
            "magnitude-pruned variant, or a checkpoint written by `sparseland prune` or `sparseland quantize`"
        )
    fmt = args.pattern or args.format
    vocab = model.config.vocab_size
    prompt = torch.randint(3, min(1000, vocab), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    bw = read_bandwidth_gbs()
    dt = args.value_dtype
    # the model's own float weights, dense, in fp32 and bf16; then the model in its runtime formats
    # (quantized formats for quantized layers; a quantized lm_head stays quantized)
    f32 = Variant("dense", format="dense", value_dtype="float32", lm_head_dtype="float32")
    bf16 = Variant("dense_bf16", format="dense", value_dtype="bfloat16", lm_head_dtype="bfloat16")
    ours = Variant("model", format=fmt, value_dtype=dt, lm_head_dtype=None if quantized else dt)
    models = {
        "dense": build_variant(model, f32),
        "dense_bf16": build_variant(model, bf16),
        "model": build_variant(sparse, ours, already_sparse=True),
    }
    rows = time_decode(models, prompt, args.new_tokens, args.rounds, base="dense")
    kern = [] if args.skip_kernels else kernel_ratios(rounds=args.rounds * 2)
    out = {
        "model": args.model,
        "checkpoint_mb": _checkpoint_mb(args.model),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbs": bw,
        "peak_rss_mb": rss_mb(),
        "decode": rows,
        "kernels": kern,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print_bench(out, bw)
    return 0


def _print_bench(out: dict, bw: float) -> None:
    """The readable table of ``sparseland bench``: decode variants, then kernel speedups."""
    size = f", checkpoint {out['checkpoint_mb']:.1f} MB" if out["checkpoint_mb"] else ""
    print(
        f"model {out['model']}{size}, {out['threads']} threads, read bandwidth {bw:.1f} GB/s, "
        f"RSS {out['peak_rss_mb']:.0f} MB"
    )
    print(
        f"{'variant':10} {'decode tok/s':>12} {'speedup':>8} {'prefill tok/s':>13} {'GB/s':>6} "
        f"{'of bw %':>7} {'read MB/tok':>11} {'model MB':>9}"
    )
    for r in out["decode"]:
        bound = r["achieved_gbs"] / bw * 100
        print(
            f"{r['variant']:10} {r['decode_tokens_per_s']:12.1f} {r['speedup']:8.2f} "
            f"{r['prefill_tokens_per_s']:13.1f} {r['achieved_gbs']:6.1f} {bound:7.0f} "
            f"{r['weight_bytes_per_token'] / 1e6:11.1f} {r['model_bytes'] / 1e6:9.0f}"
        )
    kern = out["kernels"]
    if kern:
        keys = [k for k in kern[0] if k.endswith("_speedup")]
        print("kernel speedups over our dense fp32 matvec (x), per layer shape (out x in):")
        print(f"{'shape':10} {'dense GB/s':>10} " + " ".join(f"{k.removesuffix('_speedup'):>14}" for k in keys))
        for r in kern:
            print(f"{r['shape']:10} {r['dense_fp32_gbs']:10.1f} " + " ".join(f"{r[k]:14.2f}" for k in keys))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="greedy generation with the lean decode loop (through the chat template unless --raw)"
    )
    add_model_args(p)
    p.add_argument(
        "--prompt",
        required=True,
        help="the user's message, asked through the model's chat template when its tokenizer has one (the "
        "answer is printed); with --raw, text to continue",
    )
    p.add_argument("--raw", action="store_true", help="continue --prompt as raw text, without the chat template")
    p.add_argument("--system", default=None, help="system prompt for the chat template (default: the template's own)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--sparse-runtime", action="store_true", help="run Linear layers on sparseland's kernels")
    p.add_argument("--format", default="auto", help=FORMAT_HELP)
    p.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight values")
    p.add_argument("--threads", type=positive_int, default=None, help="torch/kernel threads (default: torch's)")
    p.add_argument(
        "--kv-dtype",
        default="float32",
        choices=["float32", "int8"],
        help="KV cache: float32, or int8 codes with a float32 scale per token and head (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_generate_command)

    p = sub.add_parser(
        "bench",
        help="a sparse or quantized model's decode/prefill speed, bytes and size next to dense fp32 and bf16, "
        "side by side in one run",
    )
    add_model_args(p)
    p.add_argument("--prune-sparsity", type=fraction, default=None, help="magnitude-prune a copy to this sparsity")
    p.add_argument("--pattern", default=None, help="N:M pattern for the pruned copy, e.g. 2:4")
    p.add_argument("--format", default="auto", help=FORMAT_HELP)
    p.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16"], help="values (both sides)")
    p.add_argument(
        "--new-tokens", type=positive_int, default=32, help="decoded tokens per round (default: %(default)s)"
    )
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="prefill length (default: %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch/kernel threads (default: torch's)")
    p.add_argument("--skip-kernels", action="store_true", help="skip the per-shape kernel ratios")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_bench_command)
