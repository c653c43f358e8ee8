"""Post-training weight pruning on the embedded model: perplexity and pruning time of each method.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_pruning.py [--quick] [--only wanda,sparsegpt]

Loads the model once, keeps the dense weights, and for every configuration restores them, prunes,
and evaluates perplexity on a fixed subset of the evaluation part of the embedded text (the first
``--eval-windows`` windows of ``--seq-len`` tokens), side by side with the dense model in the same run.
Calibration: ``--calib-samples`` windows of ``--calib-len`` tokens from the calibration part (seeded).
Results are rewritten atomically after every configuration to results/pruning.json and pruning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sparseland import load_corpus, load_model, perplexity, sparsify_
from sparseland.io import write_text_atomic
from sparseland.weights import DSnoTConfig, MagnitudeConfig, RandomConfig, SparseGPTConfig, WandaConfig

RESULTS = Path(__file__).parent / "results"
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)]
CLASSES = {
    "magnitude": MagnitudeConfig,
    "random": RandomConfig,
    "wanda": WandaConfig,
    "sparsegpt": SparseGPTConfig,
}


def plan(methods: list[str], extras: bool) -> list[dict]:
    """The configurations to run, in order: plain methods first, then OWL and DSnoT variants."""
    runs = []
    for method in methods:
        pats = PATTERNS if method != "random" else [("unstructured", 0.5), ("2:4", 0.5)]
        runs += [dict(method=method, pattern=p, sparsity=s, allocation="uniform", refine=None) for p, s in pats]
    if extras:
        for method in [m for m in ("wanda", "sparsegpt") if m in methods]:
            for s in (0.5, 0.6, 0.7):
                runs.append(dict(method=method, pattern="unstructured", sparsity=s, allocation="owl", refine=None))
            for p, s in PATTERNS:
                if method == "sparsegpt" and p == "unstructured" and s == 0.6:
                    continue
                runs.append(dict(method=method, pattern=p, sparsity=s, allocation="uniform", refine="dsnot"))
            if method == "wanda":
                runs.append(dict(method=method, pattern="unstructured", sparsity=0.7, allocation="owl", refine="dsnot"))
    return runs


def make_config(run: dict, seed: int):
    common = dict(sparsity=run["sparsity"], pattern=run["pattern"], allocation=run["allocation"], seed=seed)
    if run["refine"] == "dsnot":
        return DSnoTConfig(init=run["method"], **common)
    return CLASSES[run["method"]](**common)


def label(run: dict) -> str:
    pat = f"{run['sparsity']:.0%}" if run["pattern"] == "unstructured" else run["pattern"]
    extra = "".join([" +OWL" if run["allocation"] == "owl" else "", " +DSnoT" if run["refine"] else ""])
    return f"{run['method']}{extra} {pat}"


def markdown(doc: dict) -> str:
    s = doc["setup"]
    dense = doc["dense"]["perplexity"]
    lines = [
        "# Post-training weight pruning (benchmarks/bench_pruning.py)",
        "",
        f"Model {s['model']}; text {s['text']}. Perplexity on {s['eval_windows']} evaluation windows "
        f"of {s['seq_len']} tokens ({s['eval_tokens']} predictions), "
        + ("the whole evaluation part. " if s.get("eval_all") else "the first ones, not the whole evaluation part. ")
        + f"Calibration: {s['calib_samples']} x {s['calib_len']} tokens (seed {s['seed']}). Only the Linear "
        "layers of the decoder blocks are pruned; embeddings and lm_head stay dense. "
        f"{s['threads']} torch threads, {s['machine']}; shared machine, so seconds are indicative. "
        f"Date {s['date']}.",
        "",
        f"Dense perplexity: **{dense:.3f}** (eval {doc['dense']['eval_seconds']:.1f} s).",
        "",
        "| configuration | sparsity (measured) | perplexity | x dense | prune s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        lines.append(
            f"| {r['label']} | {r['measured_sparsity']:.3f} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] / dense:.2f} | {r['prune_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,random,wanda,sparsegpt")
    ap.add_argument("--no-extras", action="store_true", help="skip the OWL and DSnoT variants")
    ap.add_argument("--only", default=None, help="comma list of exact labels to run, in this order")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=0, help="0: the whole evaluation part")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "pruning"), help="output stem (.json and .md are written)")
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model)
    corpus = load_corpus(tokenizer)
    ev = corpus.evaluation(args.seq_len, args.eval_windows or None)
    calib = corpus.calibration(args.calib_samples, args.calib_len, args.seed)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    res = perplexity(model, ev, seq_len=args.seq_len, progress=False)
    doc = {
        "setup": {
            "model": args.model,
            "text": corpus.name,
            "seq_len": args.seq_len,
            "eval_windows": int(ev.shape[0]),
            "eval_all": not args.eval_windows,
            "eval_tokens": res.n_tokens,
            "calib_samples": args.calib_samples,
            "calib_len": args.calib_len,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "dense": {"perplexity": res.perplexity, "eval_seconds": res.seconds},
        "runs": [],
    }
    print(f"dense ppl {res.perplexity:.3f} ({res.seconds:.1f} s)", flush=True)
    out = Path(args.out)
    runs = plan(args.methods.split(","), not args.no_extras)
    if args.only:
        by_label = {label(r): r for r in runs}
        missing = [k for k in args.only.split(",") if k not in by_label]
        if missing:
            ap.error(f"unknown labels {missing}; known: {sorted(by_label)}")
        runs = [by_label[k] for k in args.only.split(",")]
    for run in runs:
        model.load_state_dict(dense_state)
        cfg = make_config(run, args.seed)
        rep = sparsify_(model, cfg, calibration=calib)
        r = perplexity(model, ev, seq_len=args.seq_len, progress=False)
        row = {
            "label": label(run),
            **run,
            "config": cfg.to_dict(),
            "measured_sparsity": rep.overall_sparsity,
            "block_sparsity": rep.block_sparsity,
            "prune_seconds": rep.seconds,
            "perplexity": r.perplexity,
            "eval_seconds": r.seconds,
        }
        doc["runs"].append(row)
        print(
            f"{row['label']:32s} ppl {r.perplexity:9.3f}  x{r.perplexity / res.perplexity:6.2f}  "
            f"prune {rep.seconds:6.1f} s",
            flush=True,
        )
        write_text_atomic(out.with_suffix(".json"), json.dumps(doc, indent=2))
        write_text_atomic(out.with_suffix(".md"), markdown(doc))
    write_text_atomic(out.with_suffix(".json"), json.dumps(doc, indent=2))
    write_text_atomic(out.with_suffix(".md"), markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
