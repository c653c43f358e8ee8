"""Out-of-core pruning: peak memory and time, measured in one child process per case.

Cases (``--cases``, run in this order; each child's peak RSS is its own ``ru_maxrss``):

- ``embedded``: the embedded model (SmolLM2-135M, float32) pruned with Wanda, in memory
  (``load_model`` + ``sparsify_`` + ``save_sparse_checkpoint``, as ``sparseland prune`` does) and out of
  core (``prune_offload`` from the cached safetensors directory), same calibration windows; the two
  checkpoints are compared weight by weight.
- ``tinyllama``: the random-weight TinyLlama-shaped (1.1 B) model pruned with SparseGPT out of core.
- ``llama7b``: the random-weight Llama-2-7B-shaped model (13.5 GB bf16) pruned with Wanda out of core.
- ``tinyllama-ray``: the 1.1 B model with SparseGPT, statistics from 2 Ray workers on this machine
  (peak RSS is the driver's only; the workers are other processes).

The big models come from ``benchmarks/make_big_checkpoint.py``; random weights prove memory and time,
not quality, and their calibration windows are random token ids. Each case updates
``benchmarks/results/offload.{json,md}`` when it finishes. Run it under the machine's lock:

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_offload.py --cases embedded,tinyllama,llama7b \
        --tinyllama /work/big/tinyllama-random --llama7b /work/big/llama2-7b-random
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sparseland, not an installed one
RESULTS = ROOT / "benchmarks" / "results"


def _child(case: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one case in this (child) process; returns its record."""
    import torch

    from sparseland.weights import SparseGPTConfig, WandaConfig
    from sparseland.weights.offload import iter_checkpoint_blocks, peak_rss_mb, prune_offload

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if case in ("embedded-memory", "embedded-offload"):
        from sparseland.data import load_corpus
        from sparseland.models import load_model
        from sparseland.weights.offload import model_dir_of

        cfg = WandaConfig(sparsity=0.5)
        if case == "embedded-memory":
            from sparseland import sparsify_
            from sparseland.runtime.checkpoint import save_sparse_checkpoint

            model, tok = load_model("smollm2-135m")
            calib = load_corpus(tok, None).calibration(args.calib_samples, args.seq_len, 0)
            report = sparsify_(model, cfg, calibration=calib)
            save_sparse_checkpoint(model, tok, out, metadata={"bench": case})
            rec = {"sparsity": report.overall_sparsity}
        else:
            from transformers import AutoTokenizer

            src = model_dir_of("smollm2-135m")
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            calib = load_corpus(tok, None).calibration(args.calib_samples, args.seq_len, 0)
            report = prune_offload(src, cfg, out, calib, calib_batch=args.calib_batch, progress=True)
            rec = {"sparsity": report.overall_sparsity, "block_seconds": report.block_seconds}
        rec.update(calibration=f"{args.calib_samples} x {args.seq_len} tokens", method="wanda 50%")
    else:
        path = {"tinyllama": args.tinyllama, "tinyllama-ray": args.tinyllama, "llama7b": args.llama7b}[case]
        cfg = WandaConfig(sparsity=0.5) if case == "llama7b" else SparseGPTConfig(sparsity=0.5)
        n, t = args.big_calib
        calib = torch.randint(0, 32000, (n, t), generator=torch.Generator().manual_seed(0))
        if case == "tinyllama-ray":
            from sparseland.distributed.calibration import prune_distributed

            report = prune_distributed(path, cfg, out, calib, num_workers=2, calib_batch=1, progress=True)
        else:
            report = prune_offload(path, cfg, out, calib, calib_batch=1, progress=True, resume=args.resume is not None)
        bs = report.block_seconds
        rec = {
            "method": f"{cfg.kind} 50%",
            "calibration": f"{n} x {t} random tokens, micro-batch 1",
            "sparsity": report.overall_sparsity,
            "block_seconds": bs,
            "block_seconds_first_half_median": statistics.median(bs[: len(bs) // 2]),
            "block_seconds_second_half_median": statistics.median(bs[len(bs) // 2 :]),
            "source_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "workers": report.workers,
            "resumed_from": report.resumed_from,  # block_seconds are this process's blocks only
        }
        # the checkpoint loads block by block: decode and check the head, block 0 and the last block
        t1 = time.perf_counter()
        checked = []
        last = report.resumed_from + len(bs) - 1
        for key, tensors in iter_checkpoint_blocks(out, blocks={None, 0, last}):
            w = next((v for k, v in tensors.items() if k.endswith("down_proj.weight")), None)
            if w is not None:
                assert abs(float((w == 0).float().mean()) - 0.5) < 0.01, key
            checked.append(key)
        rec["blockwise_load_check"] = {"blocks": checked, "seconds": time.perf_counter() - t1}
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["checkpoint_bytes"] = (out / "model.safetensors").stat().st_size
    return rec


def _run_case(case: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / case
    res = tmp / f"{case}.json"
    cmd = [sys.executable, __file__, "--child", case, "--child-out", str(out), "--child-json", str(res)]
    cmd += _forward(args)
    print(f"== {case}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    rec = json.loads(res.read_text())
    return rec


def _forward(args) -> list[str]:
    out = ["--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    out += ["--calib-batch", str(args.calib_batch), "--big-calib", f"{args.big_calib[0]}x{args.big_calib[1]}"]
    if args.tinyllama:
        out += ["--tinyllama", args.tinyllama]
    if args.llama7b:
        out += ["--llama7b", args.llama7b]
    if args.resume:
        out += ["--resume", args.resume]
    return out


def _markdown(data: dict) -> str:
    lines = ["# Out-of-core pruning: peak RSS and time", "", f"Command: `{data['command']}`", ""]
    lines += [f"Machine: {data['machine']}", ""]
    cases = data["cases"]
    if "embedded-memory" in cases and "embedded-offload" in cases:
        m, o = cases["embedded-memory"], cases["embedded-offload"]
        lines += [
            "## Embedded model (SmolLM2-135M float32), Wanda 50%, " + m["calibration"],
            "",
            "| run | peak RSS (MiB) | wall (s) | checkpoint (MiB) |",
            "|---|---:|---:|---:|",
            f"| in memory | {m['peak_rss_mb']:.0f} | {m['seconds']:.1f} | {m['checkpoint_bytes'] / 2**20:.1f} |",
            f"| --offload (micro-batch {data['calib_batch']}) | {o['peak_rss_mb']:.0f} | {o['seconds']:.1f} | "
            f"{o['checkpoint_bytes'] / 2**20:.1f} |",
            "",
            f"Peak RSS ratio offload / in memory: **{o['peak_rss_mb'] / m['peak_rss_mb']:.2f}x**. "
            f"Max abs weight difference between the two checkpoints: {data.get('embedded_max_abs_diff')}; "
            f"masks equal: {data.get('embedded_masks_equal')}.",
            "",
        ]
    for case in ("tinyllama", "llama7b", "tinyllama-ray"):
        if case not in cases:
            continue
        c = cases[case]
        bs = c["block_seconds"]
        halves = f"{c['block_seconds_first_half_median']:.1f} s vs {c['block_seconds_second_half_median']:.1f} s"
        lines += [
            f"## {case}: {c['method']}, {c['calibration']}",
            "",
            f"- source shards: {c['source_bytes'] / 1e9:.2f} GB; checkpoint: {c['checkpoint_bytes'] / 1e9:.2f} GB",
            f"- peak RSS: **{c['peak_rss_mb']:.0f} MiB**" + (" (driver only)" if c["workers"] > 1 else ""),
            f"- wall: {c['seconds']:.0f} s; {len(bs)} blocks; per block min {min(bs):.1f} s, median "
            f"{statistics.median(bs):.1f} s, max {max(bs):.1f} s; median of the first half vs the second: {halves}",
            f"- blockwise load check of blocks {c['blockwise_load_check']['blocks']}: "
            f"{c['blockwise_load_check']['seconds']:.1f} s",
            "",
            "Per-block seconds: " + ", ".join(f"{x:.1f}" for x in bs),
            "",
        ]
    return "\n".join(lines) + "\n"


def _compare_embedded(tmp: Path) -> tuple[float, bool]:
    from sparseland.runtime.checkpoint import load_sparse_checkpoint

    a = load_sparse_checkpoint(tmp / "embedded-memory")[0].state_dict()
    b = load_sparse_checkpoint(tmp / "embedded-offload")[0].state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    masks = all(bool(((a[k] == 0) == (b[k] == 0)).all()) for k in a)
    return diff, masks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="embedded,tinyllama,llama7b")
    p.add_argument("--tinyllama", default=None, help="directory written by make_big_checkpoint.py --shape tinyllama")
    p.add_argument("--llama7b", default=None, help="directory written by make_big_checkpoint.py --shape llama2-7b")
    p.add_argument("--calib-samples", type=int, default=32, help="embedded case: windows (the CLI's default)")
    p.add_argument("--seq-len", type=int, default=512, help="embedded case: tokens per window")
    p.add_argument("--calib-batch", type=int, default=2, help="embedded case: windows per micro-batch (offload)")
    p.add_argument("--big-calib", default="4x128", help="big models: WINDOWSxTOKENS of random ids")
    p.add_argument("--stem", default="offload", help="results file stem in benchmarks/results (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (deleted after; default: a temp dir)")
    p.add_argument(
        "--resume",
        default=None,
        help="the work directory (bench-offload-*) of a killed run: its big-model case resumes from the last "
        "finished block (the work directory is kept)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.big_calib = tuple(int(x) for x in args.big_calib.lower().split("x"))
    if args.child:
        rec = _child(args.child, args, Path(args.child_out))
        Path(args.child_json).write_text(json.dumps(rec))
        return
    import platform

    json_path = RESULTS / f"{args.stem}.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if "cases" not in data:  # no file, or one in another layout: start a new one (cases already run are kept)
        data = {"cases": {}}
    data["command"] = "python benchmarks/bench_offload.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = ", ".join(f"{x:.0f}" for x in os.getloadavg())
    data["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, shared; load average at start {load}"
    data["calib_batch"] = args.calib_batch
    tmp = Path(args.resume) if args.resume else Path(tempfile.mkdtemp(prefix="bench-offload-", dir=args.workdir))
    from sparseland.io import write_results

    try:
        for case in args.cases.split(","):
            subcases = ["embedded-memory", "embedded-offload"] if case == "embedded" else [case]
            for sub in subcases:
                data["cases"][sub] = _run_case(sub, args, tmp)
                data["cases"][sub]["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            if case == "embedded":
                data["embedded_max_abs_diff"], data["embedded_masks_equal"] = _compare_embedded(tmp)
            for sub in subcases:
                shutil.rmtree(tmp / sub, ignore_errors=True)
            write_results(RESULTS, args.stem, data, _markdown(data))
            print(_markdown(data), flush=True)
    finally:
        if not args.resume:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
