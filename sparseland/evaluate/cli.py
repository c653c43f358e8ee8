"""``sparseland longctx``: accuracy on the locally generated RULER-style long-context suite.

    sparseland longctx --length 4096 --length 8192                       # the dense model
    sparseland longctx --method vertical_slash --sparsity 0.9 --length 4096 --compare-dense
    sparseland longctx --method quest:page_size=4,refine=4 --sparsity 0.95 --compare-dense

Registered through ``sparseland.cli.COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import json
import time

from sparseland.cli import fraction
from sparseland.errors import SparselandError

# The longest length at which the dense embedded model solves (>= 50%) all three needle tasks
# (benchmarks/results/longctx_dense.md), where sparse attention methods are judged.
DEFAULT_LENGTH = 2048


def _tasks(values: list[str] | None) -> list[str]:
    from sparseland.data.longctx import TASKS

    if not values:
        return list(TASKS)
    tasks = [t for v in values for t in v.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SparselandError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return tasks


def check_method(method: str, sparsity: float | None) -> tuple[str, dict]:
    """The method's name and config fields (``quest:page_size=4,refine=4``); rejects an unknown method
    (listing the known ones), an unknown field or a missing sparsity, before any loading."""
    if method == "dense":
        return method, {}
    from sparseland import registry
    from sparseland.attention.configs import parse_method_spec

    name, fields = parse_method_spec(method, flag="--method")
    known = registry.names("attention")
    if name not in known:
        raise SparselandError(f"unknown method {name!r}; choose from dense, {', '.join(known)}")
    if sparsity is None:
        raise SparselandError(f"--method {method} needs --sparsity S (fraction of attention skipped, e.g. 0.9)")
    try:
        registry.make_config(name, sparsity, **fields)
    except SparselandError as exc:  # an unknown field
        raise SparselandError(f"--method {method}: {exc}") from None
    return name, fields


def _measured(attention, model) -> dict:
    out = {}
    for phase in ("prefill", "decode"):
        try:
            out[f"measured_{phase}_sparsity"] = float(attention.measured_sparsity(model, phase))
        except (SparselandError, ZeroDivisionError, ValueError):
            out[f"measured_{phase}_sparsity"] = None
    return out


def _run(args: argparse.Namespace) -> int:
    from sparseland.data.longctx import generate_samples
    from sparseland.data.text import embedded_text, read_text_file
    from sparseland.evaluate.longctx import evaluate_longctx, format_table
    from sparseland.models import load_model
    from sparseland.models.loader import model_context_length

    tasks = _tasks(args.tasks)
    name, fields = check_method(args.method, args.sparsity)
    if args.kv_dtype != "float32" and (args.method != "dense" or args.backend != "lean"):
        raise SparselandError(
            f"--kv-dtype {args.kv_dtype} runs dense attention in the lean loop only; use --kv-dtype float32 with "
            f"--method {args.method} / --backend {args.backend}"
        )
    lengths = sorted(set(args.length or [DEFAULT_LENGTH]))
    text = embedded_text() if args.text is None else read_text_file(args.text)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    samples = generate_samples(
        tokenizer, lengths, tasks, args.samples, args.seed, text, model_context_length(model), progress=not args.json
    )
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "progress": not args.json,
        "backend": args.backend,
        "kv_dtype": args.kv_dtype,
    }
    results = []
    if args.method == "dense" or args.compare_dense:
        results.append(evaluate_longctx(model, tokenizer, samples, label="dense", **kw))
    if args.method != "dense":
        import sparseland.attention as attention
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        config = make_config(name, args.sparsity, **fields)
        sparsify_(model, config)
        if hasattr(attention, "reset_sparsity"):
            attention.reset_sparsity(model)
        label = f"{args.method}@{args.sparsity:g}"
        res = evaluate_longctx(model, tokenizer, samples, label=label, **kw)
        res.info = {"method": name, "sparsity": args.sparsity, "fields": fields, **_measured(attention, model)}
        attention.remove(model)
        results.append(res)
    out = {
        "model": args.model,
        "text": "pydoc_data.topics" if args.text is None else args.text,
        "tasks": tasks,
        "lengths": lengths,
        "samples_per_cell": args.samples,
        "seed": args.seed,
        "backend": args.backend,
        "kv_dtype": args.kv_dtype,
        "load_seconds": load_s,
        "results": [r.to_dict() for r in results],
    }
    if args.out:
        from sparseland.io import write_text_atomic

        write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model   {args.model}   ({len(samples)} samples, {args.samples} per task and length, seed {args.seed})")
    print("accuracy (%, RULER string_match_all) per task and length:")
    print(format_table(results))
    for r in results:
        if r.info.get("measured_prefill_sparsity") is not None or r.info.get("measured_decode_sparsity") is not None:
            pre, dec = r.info.get("measured_prefill_sparsity"), r.info.get("measured_decode_sparsity")
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"{r.label}: measured attention sparsity prefill {fmt(pre)}, decode {fmt(dec)}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    from sparseland.cli import add_model_args, positive_int

    p = sub.add_parser(
        "longctx",
        help="long-context accuracy (RULER-style needle, multi-key, multi-value, variable tracking, common words)",
        description="Generate RULER-style long-context samples locally from a seed and report accuracy per task "
        "and length (string_match_all: fraction of expected answers found in the greedy output).",
    )
    add_model_args(p)
    from sparseland.attention import METHODS

    p.add_argument(
        "--method",
        default="dense",
        help=f"dense, or a sparse attention method: {', '.join(METHODS)}, optionally with config fields, "
        "e.g. quest:page_size=4,refine=4 (default: %(default)s)",
    )
    p.add_argument("--sparsity", type=fraction, default=None, help="attention sparsity of --method, in [0, 1)")
    p.add_argument(
        "--length",
        type=positive_int,
        action="append",
        help=f"target length in tokens, prompt + answer (repeat for several; default: {DEFAULT_LENGTH})",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="tasks, space or comma separated (default: all)")
    p.add_argument("--samples", type=positive_int, default=4, help="samples per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="override each task's answer budget")
    p.add_argument(
        "--backend",
        choices=("lean", "hf"),
        default="lean",
        help="decode loop: lean (sparseland.runtime) or hf (the model's forward) (default: %(default)s)",
    )
    p.add_argument(
        "--kv-dtype",
        default="float32",
        choices=("float32", "int8"),
        help="the lean loop's KV cache: float32, or int8 with a float32 scale per token and head; int8 needs "
        "--method dense (default: %(default)s)",
    )
    p.add_argument("--compare-dense", action="store_true", help="also run dense on the same samples, side by side")
    p.add_argument("--text", default=None, help="UTF-8 text file for the haystacks instead of the embedded text")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file (atomically)")
    p.set_defaults(func=_run)
    _add_tasks_command(sub)


# ---------------------------------------------------------------- eval --against, and the task suite


def agreement_text(args: argparse.Namespace, reference, tokenizer, progress: bool = True):
    """``(name, 1-D tokens)`` to compare on: the evaluation part of the text (``--text`` or the embedded
    one), or with ``--chat`` the reference's own answers to the held-out chat instructions."""
    if getattr(args, "chat", False):
        from sparseland.data.chat import chat_tokens, self_chat

        convs = self_chat(reference, tokenizer, "eval", progress=progress)
        return f"self-generated chat ({len(convs)} conversations, eval instructions)", chat_tokens(tokenizer, convs)
    from sparseland.data import load_corpus

    corpus = load_corpus(tokenizer, args.text)
    return f"{corpus.name} (evaluation part)", corpus.eval


def eval_against_command(args: argparse.Namespace) -> int:
    """``sparseland eval --against R``: perplexity, KL (mean, p99) and top-1 agreement of --model against R."""
    import time

    from sparseland.evaluate.agreement import agreement
    from sparseland.evaluate.perplexity import _windows
    from sparseland.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    reference, ref_tok = load_model(args.against)
    load_s = time.perf_counter() - t0
    if tokenizer is None and ref_tok is None:
        raise SparselandError(f"neither {args.model} nor {args.against} has a tokenizer; save one with the model")
    tokenizer = ref_tok or tokenizer
    name, tokens = agreement_text(args, reference, tokenizer, progress=not args.json)
    windows = _windows(tokens, args.seq_len)[: args.max_windows]
    res = agreement(model, reference, windows, batch_size=args.batch_size, progress=not args.json)
    out = {"model": args.model, "against": args.against, "text": name, "load_seconds": load_s, **res.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model       {args.model}")
    print(f"against     {args.against}")
    print(f"text        {name}: {res.n_windows} x {res.seq_len} tokens ({res.n_tokens} predictions)")
    print(
        f"perplexity  {res.perplexity:.3f}   (reference {res.reference_perplexity:.3f}, ratio "
        f"{res.perplexity / res.reference_perplexity:.3f})"
    )
    print(
        f"KL          mean {res.kl_mean:.4f}   p99 {res.kl_p99:.3f}   max {res.kl_max:.3f} nats  "
        "(KL(reference || model) per next token)"
    )
    print(f"top-1       {100 * res.top1_agreement:.2f}% of next tokens the same as the reference's")
    print(f"time        load {load_s:.1f} s, compare {res.seconds:.1f} s")
    return 0


def _tasks_command(args: argparse.Namespace) -> int:
    from sparseland.data.chat import has_chat_template
    from sparseland.evaluate.tasks import KINDS, evaluate_tasks, format_table, paired, task_suite
    from sparseland.models import load_model

    kinds = [k for v in (args.kinds or []) for k in v.split(",") if k] or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SparselandError(f"unknown task kind(s) {unknown}; choose from {', '.join(KINDS)}")
    items = [i for i in task_suite(seed=args.seed) if i.kind in kinds][: args.limit]
    model, tokenizer = load_model(args.model)
    if tokenizer is None or not has_chat_template(tokenizer):
        raise SparselandError(f"{args.model} has no tokenizer with a chat template; the task suite asks through it")
    results, reference = [], None
    if args.against:
        ref_model, _ = load_model(args.against)
        reference = evaluate_tasks(
            ref_model, tokenizer, items, label=args.against, system=args.system, progress=not args.json
        )
        del ref_model
        results.append(reference)
    results.append(
        evaluate_tasks(model, tokenizer, items, label=args.model, system=args.system, progress=not args.json)
    )
    out = {
        "model": args.model,
        "against": args.against,
        "seed": args.seed,
        "items": [i.__dict__ for i in items],
        "results": [r.to_dict() for r in results],
        "paired": paired(results[-1], reference).to_dict() if reference else None,
    }
    if args.out:
        from sparseland.io import write_text_atomic

        write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(results, reference))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_eval_against_args(p: argparse.ArgumentParser) -> None:
    """``--against`` and ``--chat`` for ``sparseland eval`` (registered in ``sparseland.cli``)."""
    p.add_argument(
        "--against",
        default=None,
        metavar="M",
        help="compare with the reference model M (e.g. smollm2-135m): KL divergence of the next-token "
        "distributions (mean, p99) and top-1 agreement, beside both perplexities",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="with --against: compare on chat-formatted text, the reference's own answers to a fixed set of "
        "held-out instructions (generated once, then cached) instead of the evaluation part of the text",
    )


def _add_tasks_command(sub) -> None:
    from sparseland.cli import add_model_args, positive_int
    from sparseland.evaluate.tasks import KINDS

    p = sub.add_parser(
        "tasks",
        help="the offline task suite: Python expressions, arithmetic, facts and multiple choice, through the "
        "chat template, scored exactly",
        description="Ask every item of the offline task suite through the chat template, decode greedily and "
        "score the parsed answer exactly; with --against R also run R on the same items and report the paired "
        "difference with its standard error and the flips (right to wrong, wrong to right).",
    )
    add_model_args(p)
    p.add_argument("--against", default=None, metavar="M", help="reference model run on the same items")
    p.add_argument("--kinds", nargs="+", default=None, help=f"task kinds (default: all of {', '.join(KINDS)})")
    p.add_argument("--limit", type=positive_int, default=None, help="ask at most this many items")
    p.add_argument("--seed", type=int, default=0, help="suite seed (default: %(default)s)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file (atomically)")
    p.set_defaults(func=_tasks_command)
