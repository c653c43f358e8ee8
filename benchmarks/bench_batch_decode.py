"""What continuous batching gains, without HTTP: B sequences decoded one fused step each (what the
server runs with ``--no-batch``) vs one ``batched_step`` for all B (``--batch``), side by side.

    flock /tmp/sparseland-heavy.lock env OMP_WAIT_POLICY=PASSIVE \\
        python benchmarks/bench_batch_decode.py --threads 2 --models smollm2-135m,DIR_SPARSE,DIR_INT4 \\
        --batch-sizes 2,4 --steps 24 --rounds 5
    -> benchmarks/results/batch_decode.{json,md}

Each model is loaded as ``sparseland serve`` loads it (``load_for_serving``: the sparse runtime, format
auto). For each batch size B: two sets of B decoders, each prefilled with the same B prompts of 64-256
tokens (the embedded text, seeded); then rounds, alternating the two ways (serial first in even rounds,
batched first in odd ones), each way decoding ``--steps`` tokens for every sequence of its own set
(greedy, each sequence fed its own last token). Reported: aggregate tok/s of each way (B x steps / time,
median over rounds), their ratio, and how many greedy tokens the two ways chose alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve, beside this script
from bench_serve import prompt_ids  # noqa: E402  (the serve benchmark's prompts, as token ids)


def prefilled(model, ids: list[list[int]], room: int):
    from sparseland.runtime.generate import LeanDecoder

    decs, toks = [], []
    for p in ids:
        dec = LeanDecoder(model, len(p) + room)
        toks.append(int(dec.step(torch.tensor([p])).argmax()))
        decs.append(dec)
    return decs, toks


def run_serial(decs, toks, steps: int) -> tuple[float, list[list[int]]]:
    out = [[] for _ in decs]
    t0 = time.perf_counter()
    for _ in range(steps):
        for b, dec in enumerate(decs):
            toks[b] = int(dec.step(torch.tensor([[toks[b]]])).argmax())
            out[b].append(toks[b])
    return time.perf_counter() - t0, out


def run_batched(decs, toks, steps: int) -> tuple[float, list[list[int]]]:
    from sparseland.runtime.batchstep import batched_step

    out = [[] for _ in decs]
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = batched_step(decs, toks)
        for b in range(len(decs)):
            toks[b] = int(logits[b].argmax())
            out[b].append(toks[b])
    return time.perf_counter() - t0, out


def measure(model, tok, B: int, steps: int, rounds: int, seed: int) -> dict:
    ids = prompt_ids(tok, B, seed)
    room = steps * (rounds + 1) + 2
    sets = {"serial": prefilled(model, ids, room), "batched": prefilled(model, ids, room)}
    fns = {"serial": run_serial, "batched": run_batched}
    times: dict[str, list[float]] = {"serial": [], "batched": []}
    same = total = 0
    for r in range(rounds + 1):  # round 0 warms up, not counted
        order = ("serial", "batched") if r % 2 == 0 else ("batched", "serial")
        got = {}
        for way in order:
            decs, toks = sets[way]
            seconds, got[way] = fns[way](decs, toks, steps)
            if r:
                times[way].append(seconds)
        for a, b in zip(got["serial"], got["batched"], strict=True):
            for x, y in zip(a, b, strict=True):  # alike until the first difference (then the sequences part)
                if x != y:
                    break
                same += 1
        total += B * steps
    tps = {way: B * steps / statistics.median(ts) for way, ts in times.items()}
    path = sets["serial"][0][0].path
    return {
        "batch": B,
        "serial_path": path,
        "serial_tok_s": tps["serial"],
        "batched_tok_s": tps["batched"],
        "ratio": tps["batched"] / tps["serial"],
        "greedy_alike": f"{same}/{total}",
        "times": times,
    }


def markdown(command: str, rows: list[dict], threads: int) -> str:
    lines = [
        "# Continuous batching: B sequences per step vs one fused step each",
        "",
        f"Command: `{command}`",
        "",
        f"{threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}. "
        "Serial: each sequence's token by its own `LeanDecoder.step` (the fused C++ step, "
        "what `sparseland serve --no-batch` runs); batched: one `batched_step` for all B (the Python step with "
        "B rows through the runtime's kernels, what `--batch` runs). Aggregate tok/s = B x steps / time, "
        "median of the rounds; greedy alike = tokens the two ways chose the same (per sequence, up to the "
        "first difference).",
        "",
        "| model | B | serial path | serial tok/s | batched tok/s | batched / serial | greedy alike |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['serial_path']} | {r['serial_tok_s']:.1f} | "
            f"{r['batched_tok_s']:.1f} | {r['ratio']:.2f}x | {r['greedy_alike']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated model specs (names or directories)")
    ap.add_argument("--batch-sizes", default="2,4")
    ap.add_argument("--steps", type=int, default=24, help="tokens per sequence per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="batch_decode")
    args = ap.parse_args()
    policy = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={policy} " if policy else "") + "python benchmarks/bench_batch_decode.py "
    command += " ".join(sys.argv[1:])
    from sparseland.io import write_results
    from sparseland.serve.server import load_for_serving

    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models.split(","):
        model, tok, info = load_for_serving(spec)
        for B in (int(b) for b in args.batch_sizes.split(",")):
            row = {"model": Path(spec).name, "formats": info.get("runtime_formats")}
            row |= measure(model, tok, B, args.steps, args.rounds, args.seed)
            print(row, flush=True)
            rows.append(row)
        del model
    md = markdown(command, rows, args.threads)
    write_results(Path(args.out), args.stem, {"command": command, "args": vars(args), "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
