"""Recovery of a pruned embedded model by distillation from the dense model: perplexity and cost.

    sparseland prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --calib-samples 16 --out PRUNED
    flock /tmp/sparseland-heavy.lock python benchmarks/bench_recovery.py --pruned PRUNED --steps 150

Loads the dense teacher and the pruned student, measures the perplexity of both on the first
``--eval-windows`` evaluation windows of ``--eval-seq-len`` tokens (the README's setup), fine-tunes the
student with ``sparseland.training.finetune`` on windows from the calibration part (evaluating every
``--eval-every`` steps for the curve; evaluation time is excluded from the training cost), then reloads the
saved output and checks bit-exactly that every pruned weight is still +0.0 and no kept weight became 0.
Results are rewritten atomically after every evaluation to results/recovery.json and recovery.md.
The run directory ``--run-dir`` keeps checkpoints, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from sparseland import load_corpus, load_model, perplexity
from sparseland.io import write_text_atomic
from sparseland.runtime.checkpoint import read_manifest
from sparseland.training.finetune import finetune, trainable_parameters
from sparseland.training.masking import default_filter

RESULTS = Path(__file__).parent / "results"


def zero_pattern_report(before: torch.nn.Module, after: torch.nn.Module) -> dict:
    """Compare the zero patterns of the masked weights: pruned entries must stay +0.0, kept ones nonzero."""
    a = dict(after.named_parameters())
    pruned = changed = grown = 0
    for name, w0 in before.named_parameters():
        if not default_filter(name, w0):
            continue
        w1 = a[name].detach()
        zero0 = w0.detach() == 0
        pruned += int(zero0.sum())
        changed += int((w1[zero0].view(torch.int32) != 0).sum())  # not the +0.0 bit pattern
        grown += int((w1[~zero0] == 0).sum())
    return {"pruned_weights": pruned, "pruned_now_nonzero": changed, "kept_now_zero": grown}


def markdown(doc: dict) -> str:
    s, r = doc["setup"], doc["results"]
    dense = r["dense"]["perplexity"]
    lines = [
        "# Recovery fine-tuning by distillation (benchmarks/bench_recovery.py)",
        "",
        f"Student: {s['pruned']} ({s['prune_method']}), teacher {s['teacher']}. Fine-tuned with "
        f"`sparseland.training.finetune`: {s['steps']} AdamW steps of {s['batch_size']} x {s['seq_len']} tokens "
        f"(windows at seeded random offsets in the calibration part of {s['text']}), peak lr {s['lr']}, "
        f"{s['warmup_steps']} warm-up steps then cosine to 0, loss = {s['kd_weight']} x KD(T={s['temperature']}) "
        f"+ {s['feature_weight']} x SquareHead + {s['ce_weight']} x CE. Trainable: {s['trainable_params']:,} "
        "parameters (decoder blocks; embeddings/lm_head frozen). Perplexity on the first "
        f"{s['eval_windows']} evaluation windows of {s['eval_seq_len']} tokens. {s['threads']} torch threads, "
        f"{s['machine']}, torch {s['torch']}; shared machine. Date {s['date']}.",
        "",
        "| model | perplexity | x dense |",
        "|---|---:|---:|",
        f"| dense | {dense:.3f} | 1.00 |",
        f"| pruned, one-shot | {r['before']['perplexity']:.3f} | {r['before']['perplexity'] / dense:.2f} |",
    ]
    if "after" in r:
        lines.append(
            f"| pruned + fine-tuned ({s['steps']} steps) | {r['after']['perplexity']:.3f} | "
            f"{r['after']['perplexity'] / dense:.2f} |"
        )
    lines += ["", "Curve (perplexity of the student during fine-tuning):", "", "| step | perplexity | x dense |"]
    lines += ["|---:|---:|---:|"]
    lines += [f"| {c['step']} | {c['perplexity']:.3f} | {c['perplexity'] / dense:.2f} |" for c in r["curve"]]
    if "cost" in r:
        c = r["cost"]
        lines += [
            "",
            f"Cost: {c['train_minutes']:.1f} min of training ({c['seconds_per_step']:.1f} s/step, "
            f"{c['tokens_per_second']:.0f} tokens/s incl. the teacher forward), evaluations excluded.",
        ]
    if "mask" in r:
        m = r["mask"]
        ok = m["pruned_now_nonzero"] == 0 and m["kept_now_zero"] == 0
        lines += [
            "",
            f"Mask: {'unchanged' if ok else 'CHANGED'} - of {m['pruned_weights']:,} pruned weights "
            f"{m['pruned_now_nonzero']} are not +0.0 in the saved output, and {m['kept_now_zero']} kept weights "
            "became 0 (compared bit-exactly, saved output reloaded with load_model).",
        ]
    if doc.get("notes"):
        lines += ["", doc["notes"]]
    return "\n".join(lines) + "\n"


def save(doc: dict, name: str) -> None:
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(doc, indent=1))
    write_text_atomic(RESULTS / f"{name}.md", markdown(doc))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pruned", required=True, help="sparse checkpoint written by `sparseland prune`")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=50, help="perplexity curve every N steps (0: none)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default="/tmp/sparseland-recovery-run", help="fine-tune output (resumable)")
    ap.add_argument("--name", default="recovery", help="results file name under benchmarks/results")
    return ap


def setup_record(args: argparse.Namespace, meta: dict, student, corpus) -> dict:
    return {
        **{k: v for k, v in vars(args).items() if k not in ("run_dir", "name")},
        "prune_method": meta.get("method", {}).get("kind", "?") + f" {meta.get('method', {}).get('sparsity')}",
        "warmup_steps": max(1, round(0.05 * args.steps)),
        "trainable_params": sum(p.numel() for p in trainable_parameters(student).values()),
        "text": corpus.name,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def extrapolate_steps_to_1_3x(curve: list[dict], dense_ppl: float) -> float | None:
    """Steps at which a log-log line through ``curve``'s points of (perplexity ratio - 1) against steps
    reaches 0.3 (1.3x dense); None when the fit does not fall."""
    pts = [(math.log(c["step"]), math.log(c["perplexity"] / dense_ppl - 1)) for c in curve]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(mx + (math.log(0.3) - my) / slope) if slope < 0 else None


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)

    teacher, tok = load_model(args.teacher)
    student, _ = load_model(args.pruned)
    pruned_ref, _ = load_model(args.pruned)  # untouched copy for the zero-pattern comparison
    corpus = load_corpus(tok)
    windows = corpus.calibration(args.steps * args.batch_size, args.seq_len, 0)  # (N, T)
    ev = corpus.evaluation(args.eval_seq_len, args.eval_windows)  # (W, T_eval)
    meta = read_manifest(args.pruned)["metadata"]
    doc = {"setup": setup_record(args, meta, student, corpus), "results": {"curve": []}}
    res = doc["results"]
    res["dense"] = perplexity(teacher, ev, seq_len=args.eval_seq_len).to_dict()
    res["before"] = perplexity(student, ev, seq_len=args.eval_seq_len).to_dict()
    res["curve"].append({"step": 0, "perplexity": res["before"]["perplexity"]})
    print(f"dense {res['dense']['perplexity']:.3f}, pruned {res['before']['perplexity']:.3f}", flush=True)
    save(doc, args.name)

    eval_seconds = 0.0

    def on_step(step: int, rec: dict) -> None:
        nonlocal eval_seconds
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            t0 = time.perf_counter()
            p = perplexity(student, ev, seq_len=args.eval_seq_len, progress=False).perplexity
            student.train()  # perplexity() leaves the model in eval mode
            eval_seconds += time.perf_counter() - t0
            res["curve"].append({"step": step, "perplexity": p, "loss": rec["total"]})
            print(f"step {step}: perplexity {p:.3f} ({p / res['dense']['perplexity']:.2f}x dense)", flush=True)
            save(doc, args.name)

    out = finetune(
        student,
        teacher,
        windows,
        args.steps,
        args.lr,
        args.batch_size,
        out_dir=args.run_dir,
        tokenizer=tok,
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        feature_weight=args.feature_weight,
        ce_weight=args.ce_weight,
        save_every=50,
        on_step=on_step,
    )
    train_s = out.seconds - eval_seconds
    done = args.steps - out.resumed_from
    res["cost"] = {
        "train_minutes": train_s / 60,
        "seconds_per_step": train_s / done,
        "tokens_per_second": done * args.batch_size * args.seq_len / train_s,
        "steps_this_run": done,
    }
    res["losses"] = out.losses
    saved, _ = load_model(args.run_dir)  # the published output, reloaded
    res["after"] = perplexity(saved, ev, seq_len=args.eval_seq_len).to_dict()
    res["curve"].append({"step": args.steps, "perplexity": res["after"]["perplexity"], "loss": out.losses[-1]["total"]})
    res["mask"] = zero_pattern_report(pruned_ref, saved)
    ratio = res["after"]["perplexity"] / res["dense"]["perplexity"]
    res["reached_1_3x"] = ratio <= 1.3
    if not res["reached_1_3x"] and len(res["curve"]) >= 3:
        steps_to = extrapolate_steps_to_1_3x(res["curve"][-3:], res["dense"]["perplexity"])
        if steps_to is not None:
            res["extrapolated_steps_to_1_3x"] = steps_to
    print(json.dumps({k: res[k] for k in ("after", "cost", "mask", "reached_1_3x")}, indent=1))
    save(doc, args.name)


if __name__ == "__main__":
    main()
