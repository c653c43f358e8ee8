"""Single-stream decode with libgomp's default wait policy vs ``OMP_WAIT_POLICY=PASSIVE`` vs one thread,
each in its own process (libgomp reads the variable once, when it loads), alternated.

    flock /tmp/sparseland-heavy.lock python benchmarks/probe_omp_wait.py [--model smollm2-135m] [--reps 2]

Prints one line per process: the policy, the threads, and the decode tok/s of three greedy runs of 48
tokens (after an 8-token warm-up), as ``sparseland serve`` loads the model. No results file: a probe
of how the machine's other load meets spinning OpenMP threads (docs/results.md, Serving).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("default", 2), ("PASSIVE", 2), ("default", 1))


def child(model: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from sparseland.runtime.generate import greedy_generate
    from sparseland.serve.server import load_for_serving

    m, tok, _ = load_for_serving(model)
    ids = torch.tensor([tok("The history of the city begins in the early years of the settlement, when")["input_ids"]])
    greedy_generate(m, ids, 8)
    runs = [greedy_generate(m, ids, 48, stop_at_eos=False) for _ in range(3)]
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    tps = [round(r.decode_tokens_per_s, 1) for r in runs]
    print(f"{policy} t={threads} {model}: decode tok/s {tps} path {runs[-1].path}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # threads, in a child process
    args = ap.parse_args()
    if args.child is not None:
        child(args.model, args.child)
        return 0
    for _ in range(args.reps):
        for policy, threads in CONFIGS:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env["PYTHONPATH"] = str(ROOT)
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "--model", args.model, "--child", str(threads)]
            subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    print("load average:", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
