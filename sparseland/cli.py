"""The ``sparseland`` command. Thin: parses arguments, calls the library, prints readable results.

User errors (``SparselandError``) print one line on stderr and exit with status 2, no traceback.
Each area adds its subcommands through an ``add_commands(subparsers)`` function listed in
``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from sparseland.cliargs import fraction, non_negative_int, positive_int, share  # noqa: F401  (shared types)
from sparseland.errors import SparselandError

COMMAND_MODULES: list[str] = [
    "sparseland.bench.cli",
    "sparseland.weights.cli",
    "sparseland.quant.cli",
    "sparseland.runtime.cli",
    "sparseland.activations.cli",
    "sparseland.attention.cli",
    "sparseland.evaluate.cli",
    "sparseland.training.cli",
    "sparseland.serve.cli",
    "sparseland.peft.cli",
    "sparseland.sae.cli",
    "sparseland.moe.cli",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sparseland's error style: one line ``sparseland: error: ...`` on stderr, exit 2
    (the usage text is one ``--help`` away instead of printed above the error)."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix("sparseland").strip()
        where = f"{sub}: " if sub else ""
        self.exit(2, f"sparseland: error: {where}{message} (see `{self.prog} --help`)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="known name (smollm2-135m, gemma3-270m), local model directory, sparse checkpoint, .gguf file or "
        "cached hub id (default: %(default)s)",
    )


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="UTF-8 text file to use instead of the embedded text")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument(
        "--max-windows",
        type=positive_int,
        default=None,
        help="evaluate at most this many windows (default: all)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default: %(default)s)")


def check_new_dir(out: str) -> None:
    """Refuse an output directory that exists (checkpoints are written whole, never over another)."""
    from pathlib import Path

    if Path(out).expanduser().exists():
        raise SparselandError(f"--out {out} already exists; choose a new directory or delete it first")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """``--calib-text`` and ``--calib-chat``: where the calibration windows come from (see
    ``calibration_from_args``)."""
    p.add_argument(
        "--calib-text",
        default=None,
        metavar="FILE",
        help="calibrate on this UTF-8 text file (all of it) instead of the calibration part of --text or the "
        "embedded text",
    )
    p.add_argument(
        "--calib-chat",
        type=share,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="SHARE",
        help="take this share of the calibration windows from chat-formatted answers the model generates for "
        "itself to a fixed set of instructions (self-calibration; cached after the first run); the flag alone "
        "means 1 (chat only), 0.5 a half-and-half mixture with the text (default: 0)",
    )


def calibration_from_args(args: argparse.Namespace, model, tokenizer, corpus):
    """``(windows, description)``: ``--calib-samples`` windows of ``--seq-len`` tokens (seed ``--seed``)
    from the calibration text (``--calib-text`` or the corpus's calibration part) and, with
    ``--calib-chat S``, a share S of them from the model's own chat answers."""
    from sparseland.data.text import calibration_windows, read_text_file, tokenize_text

    calib_text, chat = getattr(args, "calib_text", None), getattr(args, "calib_chat", 0.0) or 0.0
    name = corpus.name + " (calibration part)"
    text = corpus.calib
    if calib_text is not None:
        name, text = calib_text, tokenize_text(tokenizer, read_text_file(calib_text))
    info = {"text": name, "chat_share": chat, "samples": args.calib_samples, "seq_len": args.seq_len}
    if chat == 0:
        return calibration_windows(text, args.calib_samples, args.seq_len, args.seed), info
    from sparseland.data.chat import chat_tokens, has_chat_template, mix_calibration, self_chat

    if tokenizer is None or not has_chat_template(tokenizer):
        raise SparselandError(f"--calib-chat needs a tokenizer with a chat template; {args.model}'s has none")
    convs = self_chat(model, tokenizer, "calib")
    info["chat_conversations"] = len(convs)
    sources = [(text, 1.0 - chat), (chat_tokens(tokenizer, convs), chat)]
    return mix_calibration(sources, args.calib_samples, args.seq_len, args.seed), info


def load_with_calibration(args: argparse.Namespace, needs_calibration: bool):
    """``(model, tokenizer, corpus, calibration or None, load seconds)`` for a command that changes a
    model: ``--model``, ``--text``, and ``--calib-samples`` windows of ``--seq-len`` (seed ``--seed``),
    from ``--calib-text`` / ``--calib-chat`` when the command has them (``calibration_from_args``)."""
    from sparseland.data import load_corpus
    from sparseland.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    corpus = load_corpus(tokenizer, args.text)
    calib = calibration_from_args(args, model, tokenizer, corpus)[0] if needs_calibration else None
    return model, tokenizer, corpus, calib, load_s


def _eval_command(args: argparse.Namespace) -> int:
    if getattr(args, "against", None):
        from sparseland.evaluate.cli import eval_against_command

        return eval_against_command(args)
    if getattr(args, "chat", False):
        raise SparselandError("--chat compares on chat text against a reference; pass --against smollm2-135m too")
    from sparseland.data import load_corpus
    from sparseland.evaluate import perplexity
    from sparseland.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    corpus = load_corpus(tokenizer, args.text)
    windows = corpus.evaluation(args.seq_len, args.max_windows)
    res = perplexity(model, windows, seq_len=args.seq_len, batch_size=args.batch_size, progress=not args.json)
    out = {"model": args.model, "text": corpus.name, "load_seconds": load_s, **res.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"model       {args.model}")
        print(f"text        {corpus.name} (evaluation part: {len(corpus.eval)} of {len(corpus.tokens)} tokens)")
        print(f"windows     {res.n_windows} x {res.seq_len} tokens ({res.n_tokens} predictions)")
        print(f"perplexity  {res.perplexity:.3f}   (mean NLL {res.nll:.4f} nats)")
        print(f"time        load {load_s:.1f} s, eval {res.seconds:.1f} s ({res.n_tokens / res.seconds:.0f} tokens/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sparseland",
        description="Make transformer models sparse and measure what it costs and buys, on CPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "eval",
        help="perplexity of a model on the embedded text or a text file; with --against M, KL divergence and "
        "top-1 agreement with M",
    )
    add_model_args(p)
    add_data_args(p)
    from sparseland.evaluate.cli import add_eval_against_args

    add_eval_against_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_eval_command)

    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_commands(sub)

    if "demo" not in sub.choices:  # until the frontier lands, the main job is the dense evaluation
        p = sub.add_parser("demo", help="the main job on the embedded defaults")
        add_model_args(p)
        add_data_args(p)
        p.set_defaults(func=_eval_command, json=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # this process's own command line (a command may re-run itself with another environment)
        args.process_argv = sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except SparselandError as exc:
        print(f"sparseland: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparseland: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
