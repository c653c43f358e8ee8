"""Merge + unmerge time of each adapter method on the embedded model, at LoRA's parameter count, and whether
the weights come back bit for bit. The adapters are trained for 2 steps only: merging costs the same for any
values (an index_add and a gather over the adapter's entries, or LoRA's low-rank product), so a short run
measures it without the training bench_peft.py does.

    flock /tmp/sparseland-heavy.lock python benchmarks/probe_peft_merge.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from bench_peft import merge_unmerge_ms

from sparseland.data import calibration_windows, tokenize_text
from sparseland.data.stdlib import stdlib_text
from sparseland.io import write_results
from sparseland.models import load_model
from sparseland.peft import make_config, train_adapter

METHODS = ["lora", "spiel", "s2ft", "shira"]


def measure(threads: int) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tok = load_model("smollm2-135m")
    windows = calibration_windows(tokenize_text(tok, stdlib_text("train", 200_000)), 2, 256, seed=0)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    rows, n_params = [], None
    for method in METHODS:
        extra = {"n_params": n_params} if n_params else {"budget": 0.003}
        if method == "spiel":
            extra.update(update_every=2, accumulate=1)
        res = train_adapter(model, make_config(method, lr=1e-4, **extra), windows, 2, 1, progress=False)
        n_params = n_params or res.n_params
        ms = merge_unmerge_ms(model, res.adapter)
        exact = all(
            torch.equal(v.view(torch.int32), pristine[k].view(torch.int32)) for k, v in model.state_dict().items()
        )
        rows.append(
            {"method": method, "threads": threads, "params": res.n_params, "merge_unmerge_ms": ms, "bit_exact": exact}
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = [r for t in args.threads for r in measure(t)]
    md = [
        "# Adapter merge + unmerge on the embedded model (probe_peft_merge.py)",
        "",
        f"Command: `python benchmarks/probe_peft_merge.py --threads {' '.join(map(str, args.threads))}`; median of 7 "
        f"merge + unmerge rounds per adapter (bench_peft.merge_unmerge_ms), adapters trained 2 steps at LoRA's "
        f"parameter count; 1-minute load average {load:.1f} at the start. Bit-exact: every weight's bits equal the "
        "base model's after the rounds.",
        "",
        "| method | threads | trainable params | merge + unmerge ms | bit-exact |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {r['method']} | {r['threads']} | {r['params']:,} | {r['merge_unmerge_ms']:.1f} | {r['bit_exact']} |"
            for r in rows
        ],
    ]
    write_results(args.out, "peft_merge", {"load_avg": load, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
