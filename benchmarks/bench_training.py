"""Sparse training from scratch at equal steps: a tiny byte-level Llama LM on the embedded text.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_training.py [--steps 400] [--seeds 0,1,2] [--workers 2]

Data: the UTF-8 bytes of the embedded text (vocabulary 256, so the blocks and not the output softmax
dominate), split by position like ``load_corpus``: the first 75% trains (random windows, seeded), the last
25% is held out for validation perplexity (per byte; the first ``--eval-windows`` non-overlapping windows).
Every run: same model, data order, optimizer and schedule for its seed; only the sparsity method differs.
Runs go to ``--workers`` processes with one torch thread each. Results are rewritten atomically after
every run to results/training.json and training.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
MODEL = dict(hidden=128, intermediate=384, layers=4, heads=4, seq_len=64)


def grid(steps: int) -> list[tuple[str, str, dict]]:
    """(name, method, config kwargs) of every configuration, with the schedules scaled to ``steps``."""
    dst = dict(update_every=max(1, steps // 16), drop_fraction=0.3, total_steps=steps, end_fraction=0.75)
    gmp = dict(start_step=steps // 10, prune_every=max(1, steps // 20), n_prunes=10)
    runs = [("dense", "dense", {})]
    for s in (0.8, 0.9):
        runs += [
            (f"static-uniform {s:.0%}", "static", dict(sparsity=s, distribution="uniform")),
            (f"static-erk {s:.0%}", "static", dict(sparsity=s, distribution="erk")),
            (f"set {s:.0%}", "set", dict(sparsity=s, distribution="erk", **dst)),
            (f"rigl {s:.0%}", "rigl", dict(sparsity=s, distribution="erk", **dst)),
            (f"gmp {s:.0%}", "gmp", dict(sparsity=s, distribution="uniform", **gmp)),
        ]
    for pat in ("2:4", "1:4", "1:8"):
        runs += [
            (f"srste {pat}", "srste", dict(pattern=pat, decay=2e-4, total_steps=steps)),
            (f"pgf {pat}", "progressive_gradient_flow", dict(pattern=pat, total_steps=steps, decay="exp")),
        ]
    return runs


def byte_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from sparseland.data.text import embedded_text, split_tokens

    data = torch.tensor(list(embedded_text().encode("utf-8")), dtype=torch.long)
    return split_tokens(data)


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=MODEL["hidden"],
        intermediate_size=MODEL["intermediate"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL["heads"],
        vocab_size=256,
        max_position_embeddings=MODEL["seq_len"],
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def eval_ppl(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=w, labels=w).loss.item() for w in windows.split(32)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def run_one(job: dict) -> dict:
    """Train one (configuration, seed) from scratch; returns its record."""
    torch.set_num_threads(1)
    from sparseland.config import SparsityConfig
    from sparseland.data.text import calibration_windows, eval_windows
    from sparseland.training import make_sparsifier
    from sparseland.weights.masks import is_nm

    steps, batch, seq = job["steps"], job["batch"], MODEL["seq_len"]
    train_part, eval_part = byte_corpus()
    windows = calibration_windows(train_part, steps * batch, seq, seed=job["seed"])  # (steps*B, T) data order
    val = eval_windows(eval_part, seq, job["eval_windows"])  # (N, T)
    model = build_model(job["seed"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    )
    sp = None
    if job["method"] != "dense":
        sp = make_sparsifier(model, opt, SparsityConfig.from_dict({"kind": job["method"], **job["kwargs"]}))
    t0 = time.perf_counter()
    for t in range(steps):
        ids = windows[t * batch : (t + 1) * batch]  # (B, T)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if sp is not None:
            sp.step()
    train_s = time.perf_counter() - t0
    # The sparsity actually reached, over the block linears (what every method sparsifies).
    lin = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n}
    nz = sum(int((p != 0).sum()) for p in lin.values())
    total = sum(p.numel() for p in lin.values())
    nm_ok = None
    if "pattern" in job["kwargs"]:
        n, m = map(int, job["kwargs"]["pattern"].split(":"))
        nm_ok = all(is_nm(p, n, m) for p in lin.values())
    return {
        **{k: job[k] for k in ("name", "method", "seed", "kwargs")},
        "val_ppl": eval_ppl(model, val),
        "final_train_loss": float(loss.item()),
        "sparsity": 1 - nz / total,
        "nm_exact": nm_ok,
        "train_seconds": train_s,
    }


def summarize(records: list[dict], order: list[str]) -> list[dict]:
    rows = []
    for name in order:
        rs = [r for r in records if r["name"] == name]
        if not rs:
            continue
        ppl = [r["val_ppl"] for r in rs]
        rows.append(
            {
                "name": name,
                "n": len(rs),
                "ppl_mean": statistics.fmean(ppl),
                "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                "sparsity": statistics.fmean(r["sparsity"] for r in rs),
                "nm_exact": all(r["nm_exact"] for r in rs) if rs[0]["nm_exact"] is not None else None,
                "seconds": statistics.fmean(r["train_seconds"] for r in rs),
            }
        )
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    m = meta
    lines = [
        "# Sparse training from scratch (tiny byte-level Llama, embedded text)",
        "",
        f"Command: `{m['command']}`  ",
        f"Model: Llama, {MODEL['layers']} layers, hidden {MODEL['hidden']}, MLP {MODEL['intermediate']}, "
        f"{MODEL['heads']} heads, vocab 256 (UTF-8 bytes), {m['params']:,} parameters ({m['block_params']:,} in "
        "the block linears, which every method sparsifies; embeddings and norms stay dense).  ",
        f"Training: {m['steps']} steps of AdamW (lr {m['lr']}, betas 0.9/0.95, weight decay 0.1, grad clip 1.0, "
        f"{m['steps'] // 20}-step warm-up then cosine to 10%), batch {m['batch']} x {MODEL['seq_len']} bytes "
        f"from the first 75% of the text (seeded random windows, same for every method at a seed).  ",
        f"Validation: perplexity per byte on the first {m['eval_windows']} {MODEL['seq_len']}-byte windows of "
        f"the last 25%. Seeds {m['seeds']}; mean +- std over seeds.  ",
        f"Machine: {m['machine']}; {m['workers']} runs in parallel, 1 torch thread each; wall time "
        f"{m['wall_seconds']:.0f} s for the grid (the machine was shared, so seconds are indicative only).  ",
        f"Schedules: SET/RigL ERK, update every {m['steps'] // 16} steps, drop fraction 0.3 cosine-decayed to 0 "
        f"at 75% of training; GMP uniform, cubic from step {m['steps'] // 10} every {m['steps'] // 20} steps, "
        "10 prunes; static masks random (uniform or ERK densities); SR-STE lambda_W 2e-4; gradient flow "
        "MDGF-exponential (beta 1 -> 1e-3 over the first 80%, hard N:M fine-tune for the last 20%, "
        "straight-through gradient as in the authors' code).",
        "",
        "| method | val ppl (mean +- std) | sparsity reached | exact N:M | train s/run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        nm = "" if r["nm_exact"] is None else ("yes" if r["nm_exact"] else "NO")
        lines.append(
            f"| {r['name']} | {r['ppl_mean']:.3f} +- {r['ppl_std']:.3f} (n={r['n']}) | {r['sparsity']:.3f} | {nm} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each (default 2)")
    ap.add_argument("--eval-windows", type=int, default=256, help="validation windows (default 256)")
    ap.add_argument("--only", default="", help="comma-separated name prefixes to run (default: the whole grid)")
    ap.add_argument("--out", default=str(RESULTS / "training"), help="output path without extension")
    args = ap.parse_args(argv)
    from sparseland.io import write_text_atomic

    seeds = [int(s) for s in args.seeds.split(",")]
    configs = grid(args.steps)
    if args.only:
        keep = tuple(p.strip() for p in args.only.split(","))
        configs = [c for c in configs if c[0].startswith(keep)]
    order = [c[0] for c in configs]
    jobs = [
        dict(name=n, method=meth, kwargs=kw, seed=s, steps=args.steps, batch=args.batch, lr=args.lr,
             eval_windows=args.eval_windows)
        for s in seeds for n, meth, kw in configs
    ]  # fmt: skip
    probe = build_model(0)
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": seeds, "workers": args.workers,
        "eval_windows": args.eval_windows, "model": MODEL,
        "params": sum(p.numel() for p in probe.parameters()),
        "block_params": sum(p.numel() for n, p in probe.named_parameters() if p.dim() == 2 and "embed" not in n),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }  # fmt: skip
    records: list[dict] = []
    out = Path(args.out)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for rec in tqdm(pool.imap_unordered(run_one, jobs), total=len(jobs), desc="runs"):
            records.append(rec)
            meta["wall_seconds"] = time.perf_counter() - t0
            tqdm.write(f"{rec['name']} seed {rec['seed']}: ppl {rec['val_ppl']:.3f} ({rec['train_seconds']:.0f} s)")
            rows = summarize(records, order)
            write_text_atomic(
                out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows, "runs": records}, indent=1)
            )
            write_text_atomic(out.with_suffix(".md"), render(meta, rows))


if __name__ == "__main__":
    main()
