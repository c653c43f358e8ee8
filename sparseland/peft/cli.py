"""``sparseland peft``: train a sparse (or LoRA) adapter on a text, save it, and report what it bought.

sparseland peft --model smollm2-135m --method spiel --budget 0.003 --train-text notes.txt --out run/ --json
sparseland peft --model pruned/ --method shira --train-text stdlib --out run/   # keeps the pruned zeros

``--train-text stdlib`` trains on the Python standard library's sources (train split) and holds out its
eval split; any other value is a UTF-8 file whose last 25% of tokens are held out. Forgetting is the
perplexity on the embedded text's evaluation part, before and after merging the adapter.
"""

from __future__ import annotations

import argparse
import json
import time

from sparseland.cli import add_model_args, check_new_dir, positive_int
from sparseland.cliargs import bounded

STDLIB = "stdlib"


_budget = bounded(
    float, lo=0, hi=1, lo_open=True, hi_open=True, name="budget", hint="pass a fraction such as 0.003 for 0.3%"
)


def target_texts(tokenizer, train_text: str, max_chars: int | None):
    """(training tokens, held-out tokens, name) of ``--train-text``."""
    from sparseland.data import load_corpus, tokenize_text

    if train_text == STDLIB:
        from sparseland.data.stdlib import stdlib_text

        train = tokenize_text(tokenizer, stdlib_text("train", max_chars))
        held = tokenize_text(tokenizer, stdlib_text("eval", max_chars))
        return train, held, "stdlib (train split / eval split)"
    corpus = load_corpus(tokenizer, train_text)
    return corpus.calib, corpus.eval, f"{train_text} (first 75% / last 25% of tokens)"


def _peft_command(args: argparse.Namespace) -> int:
    from sparseland.peft import make_config

    extra = {"targets": tuple(args.targets.split(",")) if args.targets else None}
    config = make_config(args.method, budget=args.budget, n_params=args.n_params, lr=args.lr, seed=args.seed, **extra)
    check_new_dir(args.out)
    from pathlib import Path

    from sparseland.data import calibration_windows, load_corpus
    from sparseland.evaluate import perplexity
    from sparseland.io import write_text_atomic
    from sparseland.models import load_model
    from sparseland.peft import merge_adapter_, save_adapter, train_adapter, unmerge_adapter_

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    train_tok, held_tok, text_name = target_texts(tokenizer, args.train_text, args.max_chars)
    windows = calibration_windows(train_tok, args.train_windows, args.seq_len, args.seed)
    held = held_tok[: args.eval_windows * args.seq_len]
    forget = load_corpus(tokenizer).evaluation(args.seq_len, args.eval_windows)
    progress = not args.no_progress

    def ppl(tokens):
        return perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, progress=progress)

    before = {"target": ppl(held).perplexity, "embedded": ppl(forget).perplexity}
    result = train_adapter(model, config, windows, args.steps, args.batch_size, progress=progress)
    out = Path(args.out).expanduser()
    path = save_adapter(result.adapter, out / "adapter.safetensors")
    t1 = time.perf_counter()
    record = merge_adapter_(model, result.adapter)
    merge_s = time.perf_counter() - t1
    after = {"target": ppl(held).perplexity, "embedded": ppl(forget).perplexity}
    unmerge_adapter_(model, record)
    report = {
        "model": args.model,
        "method": config.to_dict(),
        "train_text": text_name,
        "trainable_params": result.n_params,
        "budget_params": result.budget,
        "adapter_bytes": path.stat().st_size,
        "peft_lora_bytes": result.peft_adapter_bytes,
        "steps": args.steps,
        "tokens_trained": args.steps * args.batch_size * args.seq_len,
        "train_seconds": result.seconds,
        "merge_seconds": merge_s,
        "load_seconds": load_s,
        "perplexity_before": before,
        "perplexity_after": after,
        "final_loss": result.losses[-1]["loss"],
        "adapter": str(path),
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"method      {config.method}: {result.n_params} trainable parameters (budget {result.budget})")
    print(f"trained     {args.steps} steps x {args.batch_size} x {args.seq_len} tokens in {result.seconds:.1f} s")
    print(f"adapter     {path} ({report['adapter_bytes'] / 1e3:.1f} kB)")
    print(f"{'perplexity':<12}{'before':>10}{'after':>10}")
    for key, label in (("target", "target"), ("embedded", "embedded")):
        print(f"{label:<12}{before[key]:>10.3f}{after[key]:>10.3f}")
    return 0


def add_commands(subparsers) -> None:
    from sparseland.peft.configs import METHODS

    p = subparsers.add_parser("peft", help="sparse parameter-efficient fine-tuning (SpIEL, S2FT, SHiRA, LIFT, LoRA)")
    add_model_args(p)
    p.add_argument("--method", choices=sorted(METHODS), default="spiel", help="method (default: %(default)s)")
    p.add_argument(
        "--budget", type=_budget, default=0.003, help="trainable fraction of the model's parameters (default: 0.003)"
    )
    p.add_argument("--n-params", type=positive_int, default=None, help="trainable parameters (overrides --budget)")
    p.add_argument(
        "--train-text",
        required=True,
        help="UTF-8 file to fine-tune on (last 25%% of its tokens held out), or 'stdlib' for the standard "
        "library's sources (train split; eval split held out)",
    )
    p.add_argument("--max-chars", type=positive_int, default=2_000_000, help="with stdlib: characters per split")
    p.add_argument("--targets", default=None, help="comma-separated Linear names to adapt (default: the method's)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, 1e-3)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (default: %(default)s)")
    p.add_argument(
        "--train-windows", type=positive_int, default=2048, help="training windows sampled (default: %(default)s)"
    )
    p.add_argument(
        "--eval-windows", type=positive_int, default=16, help="held-out windows per text (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the selection and the data order")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="new directory for adapter.safetensors and report.json")
    p.set_defaults(func=_peft_command)
