"""Which calibration keeps a pruned chat model a chat model? KL, top-1 agreement and the task suite.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_quality.py
    python benchmarks/bench_quality.py --cells sparsegpt50:chat,wanda50:text --stem quality_part

Cells are ``method:calibration`` with method one of sparsegpt50, wanda50, sparsegpt2:4, wanda2:4 and the
calibration one of
- ``text``: windows from the calibration part of the embedded text (``pydoc_data.topics``), the default
  of ``sparseland prune``;
- ``chat``: windows of the dense model's own chat-formatted answers to the fixed "calib" instructions of
  ``sparseland.data.chat`` (self-calibration; generated once, cached on disk);
- ``mix``: half of the windows from each.

Every cell is measured against the dense model on (a) the evaluation part of the embedded text and
(b) chat-formatted text: the dense model's answers to the held-out "eval" instructions (other topics
than the calibration ones): perplexity ratio, mean / p99 KL(dense || pruned) and top-1 agreement; and
(c) the offline task suite (``sparseland.evaluate.tasks``, greedy through the chat template): accuracy,
its SE, and the paired difference from dense with its SE and the flips. Results are written after
every cell (``benchmarks/results/<stem>.{json,md}``); cells already in the json are skipped, so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import sparseland as sl
from sparseland.data.chat import chat_tokens, mix_calibration, self_chat
from sparseland.evaluate.agreement import compare
from sparseland.evaluate.perplexity import _windows
from sparseland.evaluate.tasks import TaskResult, evaluate_tasks, paired, task_suite
from sparseland.io import write_results

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "sparsegpt50": lambda: sl.SparseGPTConfig(sparsity=0.5),
    "wanda50": lambda: sl.WandaConfig(sparsity=0.5),
    "sparsegpt2:4": lambda: sl.SparseGPTConfig(pattern="2:4"),
    "wanda2:4": lambda: sl.WandaConfig(pattern="2:4"),
}
CALIBS = ("text", "chat", "mix")
DEFAULT_CELLS = (
    "sparsegpt50:text,sparsegpt50:chat,sparsegpt50:mix,wanda50:text,wanda50:chat,sparsegpt2:4:text,sparsegpt2:4:chat"
)


def parse_cells(spec: str) -> list[tuple[str, str]]:
    cells = []
    for cell in spec.split(","):
        method, _, calib = cell.rpartition(":")
        if method not in METHODS or calib not in CALIBS:
            raise SystemExit(f"bad cell {cell!r}: use METHOD:CALIB, METHOD in {list(METHODS)}, CALIB in {CALIBS}")
        cells.append((method, calib))
    return cells


def agreement_row(res) -> dict:
    return {
        "ppl": res.perplexity,
        "ppl_ratio": res.perplexity / res.reference_perplexity,
        "kl_mean": res.kl_mean,
        "kl_p99": res.kl_p99,
        "top1": res.top1_agreement,
        "tokens": res.n_tokens,
    }


def markdown(data: dict) -> str:
    s = data["setup"]
    out = [
        "# Calibration for a chat model: KL, top-1 agreement and the task suite (benchmarks/bench_quality.py)\n",
        f"Command: `{s['command']}`. Model {s['model']}; calibration {s['calib_samples']} x {s['seq_len']} "
        f"tokens (seed {s['seed']}); text = the calibration part of pydoc_data.topics, chat = the dense "
        f"model's own greedy answers (chat template, at most {s['chat_answer_tokens']} tokens) to "
        f"{s['chat_calib_conversations']} fixed instructions, "
        "mix = half of each. Measured against the dense model on the evaluation part of the text "
        f"({s['text_tokens']} predictions) and on held-out chat text ({s['chat_tokens']} predictions: the "
        f"dense model's answers to {s['chat_eval_conversations']} instructions on other topics); task suite: "
        f"{s['task_items']} items (seed 0), greedy through the chat template, exact scoring. "
        f"{s['machine']}; {s['date']}.\n",
        f"Dense task-suite accuracy: **{100 * data['dense_tasks']['accuracy']:.1f}%** "
        f"(SE {100 * data['dense_tasks']['standard_error']:.1f}); per kind: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in data["dense_tasks"]["per_kind"].items())
        + ".\n",
        "| method | calib | text ppl x | text KL mean | text KL p99 | text top-1 | chat ppl x | chat KL mean | "
        "chat KL p99 | chat top-1 | tasks % | vs dense (paired SE) | R->W | W->R | prune s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["cells"]:
        t, c, k, p = r["text"], r["chat"], r["tasks"], r["paired"]
        out.append(
            f"| {r['method']} | {r['calib']} | {t['ppl_ratio']:.3f} | {t['kl_mean']:.4f} | {t['kl_p99']:.3f} | "
            f"{100 * t['top1']:.1f}% | {c['ppl_ratio']:.3f} | {c['kl_mean']:.4f} | {c['kl_p99']:.3f} | "
            f"{100 * c['top1']:.1f}% | {100 * k['accuracy']:.1f} | {100 * p['difference']:+.1f} "
            f"({100 * p['standard_error']:.1f}) | {p['right_to_wrong']} | {p['wrong_to_right']} | "
            f"{r['prune_seconds']:.0f} |"
        )
    out.append(
        "\nppl x: perplexity over the dense model's on the same predictions; KL: KL(dense || pruned) per next "
        "token in nats; top-1: share of next tokens whose argmax equals the dense model's; tasks: accuracy in "
        "points, paired difference from dense with the standard error of the per-item differences; R->W / W->R: "
        "items dense answers right and the pruned model wrong, and the reverse."
    )
    return "\n".join(out) + "\n"


def rescore(data: dict, items: list) -> dict:
    """Score every stored answer again with the current ``score`` (the answers themselves are kept), and
    recompute the accuracies and paired comparisons: a parser fix needs no new generation."""
    from sparseland.evaluate.tasks import score

    def again(d: dict, label: str) -> TaskResult:
        if len(d["outputs"]) != len(items):
            raise SystemExit(f"{len(d['outputs'])} stored answers but {len(items)} items; pass the run's --task-stride")
        return TaskResult(
            label,
            d["kinds"],
            [score(i, o) for i, o in zip(items, d["outputs"], strict=True)],
            d["outputs"],
            d.get("seconds", 0.0),
        )

    dense = again(data["dense_tasks"], "dense")
    data["dense_tasks"] = dense.to_dict()
    for row in data["cells"]:
        res = again(row["tasks"], row["tasks"]["label"])
        row["tasks"], row["paired"] = res.to_dict(), paired(res, dense).to_dict()
    return data


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="METHOD:CALIB,... (default: %(default)s)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--text-windows", type=int, default=8, help="evaluation windows of the text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default="quality")
    ap.add_argument("--task-stride", type=int, default=1, help="ask every k-th item of the suite (default: all)")
    ap.add_argument("--chat-tokens", type=int, default=160, help="answer budget of the self-generated chat data")
    ap.add_argument("--chat-calib", type=int, default=None, help="calib instructions used (default: all)")
    ap.add_argument("--chat-eval", type=int, default=None, help="eval instructions used (default: all)")
    ap.add_argument("--chat-windows", type=int, default=None, help="chat evaluation windows (default: all)")
    ap.add_argument("--rescore", action="store_true", help="only score the stored answers again and re-render")
    return ap


def run_cell(method: str, cal: str, dense, tok, calib, text_eval, chat_eval, items, dense_tasks):
    """``(row, task result)`` of one cell: ``method`` calibrated on ``cal`` data, compared with dense on the
    text and chat windows and on the task suite (paired with dense's answers)."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    sl.sparsify_(model, METHODS[method](), calibration=calib)
    prune_s = time.perf_counter() - t0
    text = compare({"m": model}, dense, text_eval)["m"]
    chat = compare({"m": model}, dense, chat_eval)["m"]
    tasks = evaluate_tasks(model, tok, items, label=f"{method}:{cal}")
    row = {
        "method": method,
        "calib": cal,
        "prune_seconds": prune_s,
        "text": agreement_row(text),
        "chat": agreement_row(chat),
        "tasks": tasks.to_dict(),
        "paired": paired(tasks, dense_tasks).to_dict(),
    }
    return row, tasks


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cells = parse_cells(args.cells)
    path = RESULTS / f"{args.stem}.json"
    data = json.loads(path.read_text()) if path.exists() else None
    if args.rescore:
        data = rescore(data, task_suite(seed=0)[:: args.task_stride])
        write_results(RESULTS, args.stem, data, markdown(data))
        return 0

    dense, tok = sl.load_model(args.model)
    corpus = sl.load_corpus(tok)
    text_eval = corpus.evaluation(args.seq_len, args.text_windows)
    chat_eval_convs = self_chat(dense, tok, "eval", max_new_tokens=args.chat_tokens, limit=args.chat_eval)
    chat_eval = _windows(chat_tokens(tok, chat_eval_convs), args.seq_len)[: args.chat_windows]
    chat_calib_convs = self_chat(dense, tok, "calib", max_new_tokens=args.chat_tokens, limit=args.chat_calib)
    chat_stream = chat_tokens(tok, chat_calib_convs)
    calib = {
        "text": corpus.calibration(args.calib_samples, args.seq_len, args.seed),
        "chat": mix_calibration([(chat_stream, 1.0)], args.calib_samples, args.seq_len, args.seed),
        "mix": mix_calibration([(corpus.calib, 0.5), (chat_stream, 0.5)], args.calib_samples, args.seq_len, args.seed),
    }
    items = task_suite(seed=0)[:: args.task_stride]
    if data is None or data["setup"]["task_items"] != len(items):
        dense_tasks = evaluate_tasks(dense, tok, items, label="dense")
        data = {
            "setup": {
                "command": "python benchmarks/bench_quality.py " + " ".join(argv or __import__("sys").argv[1:]),
                "model": args.model,
                "calib_samples": args.calib_samples,
                "seq_len": args.seq_len,
                "seed": args.seed,
                "text_tokens": int(text_eval.shape[0] * (text_eval.shape[1] - 1)),
                "chat_tokens": int(chat_eval.shape[0] * (chat_eval.shape[1] - 1)),
                "chat_calib_conversations": len(chat_calib_convs),
                "chat_answer_tokens": args.chat_tokens,
                "chat_eval_conversations": len(chat_eval_convs),
                "task_items": len(items),
                "task_stride": args.task_stride,
                "machine": f"{torch.get_num_threads()} torch threads, {platform.machine()}, torch {torch.__version__}",
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            },
            "dense_tasks": dense_tasks.to_dict(),
            "cells": [],
        }
        write_results(RESULTS, args.stem, data, markdown(data))
    dense_tasks = TaskResult(
        "dense", data["dense_tasks"]["kinds"], data["dense_tasks"]["correct"], data["dense_tasks"]["outputs"]
    )
    done = {(r["method"], r["calib"]) for r in data["cells"]}
    for method, cal in cells:
        if (method, cal) in done:
            print(f"skip {method}:{cal} (in {path})")
            continue
        row, tasks = run_cell(method, cal, dense, tok, calib[cal], text_eval, chat_eval, items, dense_tasks)
        data["cells"].append(row)
        write_results(RESULTS, args.stem, data, markdown(data))
        print(
            f"{method}:{cal}  text top-1 {row['text']['top1']:.3f} KL {row['text']['kl_mean']:.3f}  chat top-1 "
            f"{row['chat']['top1']:.3f} KL {row['chat']['kl_mean']:.3f}  tasks {tasks.accuracy():.3f} "
            f"(dense {dense_tasks.accuracy():.3f})",
            flush=True,
        )
    write_results(RESULTS, args.stem, data, markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
