"""``sparseland finetune``: recover a pruned model by distillation from its dense teacher, mask kept exactly.

Resumes when ``--out`` holds an unfinished run of the same settings; prints perplexity on the
evaluation part before and after, next to the dense teacher's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparseland.cliargs import non_negative_int, positive_int
from sparseland.errors import SparselandError


def _config(args: argparse.Namespace):
    from sparseland.training.finetune import FinetuneConfig

    return FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        ce_weight=args.ce_weight,
        feature_weight=args.feature_weight,
        save_every=args.save_every,
        seed=args.seed,
    )


def _check_out(out: Path) -> dict | None:
    """The run record of an unfinished run in ``out`` (None for a new run); errors for anything else."""
    from sparseland.training.finetune import RUN_FILE

    if (out / "sparseland.json").is_file():
        raise SparselandError(f"--out {out} already holds a finished fine-tune; choose a new directory")
    if (out / RUN_FILE).is_file():
        return json.loads((out / RUN_FILE).read_text())
    if out.exists() and any(out.iterdir()):
        raise SparselandError(f"--out {out} exists and is not a fine-tune run; choose a new directory")
    return None


def _load_student_teacher(args: argparse.Namespace):
    """``(student, tokenizer, teacher, masks, source metadata)``: the pruned student and its dense
    teacher, checked to be the same model family with one tokenizer."""
    from sparseland.models import load_model
    from sparseland.runtime.checkpoint import read_manifest
    from sparseland.training.finetune import check_student_teacher

    student, tokenizer = load_model(args.model)
    teacher, teacher_tok = load_model(args.teacher)
    masks = check_student_teacher(student, teacher)
    if tokenizer is None:
        raise SparselandError(f"{args.model} has no tokenizer; save one next to the model")
    if teacher_tok is not None and teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise SparselandError(
            f"the tokenizers of {args.model} and {args.teacher} differ; the teacher must be the model the "
            "student was pruned from"
        )
    source_meta = {}
    if (Path(args.model) / "sparseland.json").is_file():
        source_meta = read_manifest(args.model)["metadata"]
    return student, tokenizer, teacher, masks, source_meta


def _training_windows(args: argparse.Namespace, cfg, corpus, teacher, tokenizer):
    """``(windows (N, T), N, chat share)``: calibration-part windows, a ``--chat`` share of them from
    the teacher's own chat answers (the "calib" instructions)."""
    n_windows = args.calib_windows or cfg.steps * cfg.batch_size
    chat = args.chat or 0.0
    if not chat:
        return corpus.calibration(n_windows, args.seq_len, cfg.seed), n_windows, chat
    from sparseland.data.chat import chat_tokens, has_chat_template, mix_calibration, self_chat

    if not has_chat_template(tokenizer):
        raise SparselandError(f"--chat needs a tokenizer with a chat template; {args.model}'s has none")
    convs = self_chat(teacher, tokenizer, "calib")
    sources = [(corpus.calib, 1.0 - chat), (chat_tokens(tokenizer, convs), chat)]
    return mix_calibration(sources, n_windows, args.seq_len, cfg.seed), n_windows, chat


def _evaluate_before(args: argparse.Namespace, run: dict | None, corpus, teacher, student):
    """``(evaluation record, evaluation windows)``: the dense and pruned perplexities (kept from the
    run record when resuming with the same setup); ``({}, None)`` with ``--eval-windows 0``."""
    from sparseland.evaluate import perplexity

    if not args.eval_windows:
        return {}, None
    ev_windows = corpus.evaluation(args.eval_seq_len, args.eval_windows)
    ev_key = {"windows": int(ev_windows.shape[0]), "seq_len": args.eval_seq_len, "text": corpus.name}
    prev = (run or {}).get("metadata", {}).get("evaluation", {})
    if prev.get("setup") == ev_key:  # resuming: the before-numbers are already measured
        evaluation = prev
    else:
        evaluation = {"setup": ev_key}
        for key, model in (("dense", teacher), ("before", student)):
            res = perplexity(model, ev_windows, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size)
            evaluation[key] = res.to_dict()
    d, b = evaluation["dense"]["perplexity"], evaluation["before"]["perplexity"]
    print(
        f"perplexity  dense {d:.3f}, pruned {b:.3f} ({b / d:.2f}x dense) on {ev_key['windows']} x "
        f"{args.eval_seq_len} evaluation tokens"
    )
    return evaluation, ev_windows


def _report_training(result, minutes: float) -> None:
    last = result.losses[-1]
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    print(
        f"trained     {result.steps} steps in {minutes:.1f} min{resumed}; last loss {last['total']:.4f} "
        f"(kd {last['kd']:.4f}, feature {last['feature']:.4f}, ce {last['ce']:.4f})"
    )
    print(f"mask        kept exactly: density {result.density:.4f}, every pruned weight still zero")


def _evaluate_after(args: argparse.Namespace, out: Path, student, ev_windows, evaluation: dict) -> None:
    from sparseland.evaluate import perplexity
    from sparseland.training.finetune import update_metadata

    res = perplexity(student, ev_windows, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size)
    evaluation["after"] = res.to_dict()
    d, b, a = (evaluation[k]["perplexity"] for k in ("dense", "before", "after"))
    print(f"perplexity  fine-tuned {a:.3f} ({a / d:.2f}x dense), pruned {b:.3f} ({b / d:.2f}x dense), dense {d:.3f}")
    update_metadata(out, {"evaluation": evaluation})


def _finetune_command(args: argparse.Namespace) -> int:
    cfg = _config(args)  # validate before the slow loads
    out = Path(args.out).expanduser()
    run = _check_out(out)
    if run is not None and args.no_resume:
        raise SparselandError(f"--out {out} holds an unfinished fine-tune; drop --no-resume or delete it")
    from sparseland.data import load_corpus
    from sparseland.training.finetune import finetune

    student, tokenizer, teacher, masks, source_meta = _load_student_teacher(args)
    corpus = load_corpus(tokenizer, args.text)
    windows, n_windows, chat = _training_windows(args, cfg, corpus, teacher, tokenizer)
    print(f"student     {args.model}: density {masks.density():.4f} of the decoder-block Linear weights")
    print(f"teacher     {args.teacher}")
    print(
        f"data        {n_windows} x {args.seq_len} tokens from the calibration part of {corpus.name}"
        + (f", {chat:.0%} of them from the teacher's own chat answers" if chat else "")
    )
    evaluation, ev_windows = _evaluate_before(args, run, corpus, teacher, student)
    metadata = {
        "source": {"model": args.model, "teacher": args.teacher, "metadata": source_meta},
        "data": {"text": corpus.name, "windows": n_windows, "seq_len": args.seq_len, "chat_share": chat},
        "evaluation": evaluation,
    }
    t0 = time.perf_counter()
    result = finetune(
        student,
        teacher,
        windows,
        out_dir=out,
        tokenizer=tokenizer,
        resume=not args.no_resume,
        progress=not args.no_progress,
        metadata=metadata,
        **{k: v for k, v in cfg.to_dict().items()},
    )
    _report_training(result, (time.perf_counter() - t0) / 60)
    if ev_windows is not None:
        _evaluate_after(args, out, student, ev_windows, evaluation)
    print(f"saved       {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("finetune", help="recover a pruned model by distillation from its dense teacher")
    p.add_argument("--model", required=True, help="pruned model: a sparse checkpoint from `sparseland prune`")
    p.add_argument("--teacher", default="smollm2-135m", help="dense teacher model (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (default: %(default)s)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step, divides --batch-size")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per training window (default: 256)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD softmax temperature (default: 2.0)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the logit KL term (default: 1.0)")
    p.add_argument(
        "--feature-weight", type=float, default=1.0, help="weight of the SquareHead hidden-state term (default: 1.0)"
    )
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token CE term (default: 0)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, help="default: 5%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampling and order (default: 0)")
    p.add_argument("--text", default=None, help="UTF-8 text file to use instead of the embedded text")
    from sparseland.cli import share

    p.add_argument(
        "--chat",
        type=share,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="SHARE",
        help="distil on chat-formatted data too: this share of the windows from the teacher's own greedy "
        "answers to a fixed set of instructions (generated once, cached); the flag alone means 1 (default: 0)",
    )
    p.add_argument(
        "--calib-windows",
        type=positive_int,
        default=None,
        help="training windows drawn from the calibration part (default: steps x batch size, none repeated)",
    )
    p.add_argument(
        "--eval-windows", type=non_negative_int, default=8, help="evaluation windows, 0 to skip (default: 8)"
    )
    p.add_argument("--eval-seq-len", type=positive_int, default=512, help="tokens per evaluation window")
    p.add_argument("--eval-batch-size", type=positive_int, default=4, help="windows per evaluation forward")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output directory (a sparse checkpoint when finished)")
    p.set_defaults(func=_finetune_command)
