"""Sparse fine-tuning vs LoRA at an equal trainable-parameter count, on an offline target domain.

Target domain: the Python standard library's sources (``sparseland.data.stdlib``: train split to fine-tune,
eval split held out), which the embedded model's text (CPython's pydoc topics) does not contain.
Forgetting: perplexity on the embedded text's evaluation part. Every method gets the same data (the same
windows in the same order), the same steps, learning rate and schedule; LoRA (Hugging Face peft, q_proj and
v_proj, the largest rank that fits the budget) sets the parameter count every sparse method then gets.

All methods on one model run in one process, one after another on the same base weights (checked
bit-identical after each); peak training memory is the rise of the peak RSS (VmHWM, reset before each
method) above the RSS before training. The whole run sits under ``flock /tmp/sparseland-heavy.lock``;
the machine is shared, so times are indicative.

    PYTHONPATH=. flock /tmp/sparseland-heavy.lock python benchmarks/bench_peft.py --steps 40 \\
        --pruned DIR_OF_50%_SPARSEGPT_CHECKPOINT
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DENSE_METHODS = ["lora", "spiel", "shira", "lift", "s2ft", "sparse-lora"]
PRUNED_METHODS = ["lora", "spiel", "shira", "lift", "s2ft"]


def _vm(field: str) -> float:
    """A field of /proc/self/status in MB (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so each method's peak is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _linear_zeros(model) -> dict[str, torch.Tensor]:
    return {
        n: (p == 0)
        for n, p in model.named_parameters()
        if p.dim() == 2 and "embed" not in n and "lm_head" not in n and "layers" in n
    }


def train_record(config, res) -> dict:
    """What a training run of ``config`` cost and reached (losses: means of the first and last 5 steps)."""
    return {
        "train_seconds": res.seconds,
        "trainable_params": res.n_params,
        "budget_params": res.budget,
        "config": config.to_dict(),
        "first_loss": statistics.mean(r["loss"] for r in res.losses[:5]),
        "final_loss": statistics.mean(r["loss"] for r in res.losses[-5:]),
        "spiel_swaps": res.swaps,
        "peft_lora_bytes": res.peft_adapter_bytes,
    }


def merge_unmerge_ms(model, adapter) -> float:
    """Median wall time of merging ``adapter`` into the model and unmerging it again, over 7 rounds."""
    from sparseland.peft import merge_adapter_, unmerge_adapter_

    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        record = merge_adapter_(model, adapter)
        unmerge_adapter_(model, record)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def runtime_probe(model, probe: torch.Tensor, seq_len: int, ppl) -> dict:
    """Perplexity of the merged model on ``probe`` in torch and after conversion to the sparse runtime."""
    import copy

    from sparseland.evaluate import perplexity
    from sparseland.runtime import to_sparse_runtime_

    rt = copy.deepcopy(model)
    report = to_sparse_runtime_(rt)
    with torch.no_grad():
        res_rt = perplexity(rt, probe, seq_len=seq_len, batch_size=2, progress=False).perplexity
    return {"report": str(report)[:300], "probe_ppl_merged": ppl(probe), "probe_ppl_runtime": res_rt}


def run_part(args: argparse.Namespace, model_name: str, methods: list[str], sparse_runtime: bool) -> list[dict]:
    """All methods on one model in this process (the base weights are checked bit-identical between
    methods, so one load serves all): train, save, merge/unmerge timing, perplexities after merging."""
    from sparseland.data import calibration_windows, load_corpus, tokenize_text
    from sparseland.data.stdlib import stdlib_text
    from sparseland.evaluate import perplexity
    from sparseland.models import load_model
    from sparseland.peft import make_config, merge_adapter_, save_adapter, train_adapter, unmerge_adapter_

    torch.manual_seed(0)
    print(f"== {model_name}: loading", flush=True)
    model, tok = load_model(model_name)
    train_tok = tokenize_text(tok, stdlib_text("train", args.train_chars))
    held = tokenize_text(tok, stdlib_text("eval", args.eval_chars))[: args.eval_windows * args.seq_len]
    forget = load_corpus(tok).evaluation(args.seq_len, args.eval_windows)
    windows = calibration_windows(train_tok, args.steps * args.batch_size, args.seq_len, seed=0)
    zeros = _linear_zeros(model)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl(tokens):
        return perplexity(model, tokens, seq_len=args.seq_len, batch_size=4, progress=False).perplexity

    def bits_equal() -> bool:
        return all(
            torch.equal(v.view(torch.int32), pristine[k].view(torch.int32)) for k, v in model.state_dict().items()
        )

    rows = [
        {
            "method": "base",
            "model": model_name,
            "target_ppl": ppl(held),
            "embedded_ppl": ppl(forget),
            "trainable_params": 0,
        }
    ]
    print(rows[0], flush=True)
    n_params = None
    for method in methods:
        print(f"== {model_name}: {method}", flush=True)
        extra = {"n_params": n_params} if n_params else {"budget": args.budget}
        if method == "spiel":  # three index updates in the run, each after accumulating 2 steps of gradient
            extra.update(update_every=max(2, args.steps // 4), accumulate=2)
        config = make_config(method, lr=args.lr, **extra)
        gc.collect()
        _reset_peak()
        rss0 = _vm("VmRSS")
        res = train_adapter(model, config, windows, args.steps, args.batch_size, progress=True)
        out = {"method": method, "model": model_name, "train_peak_extra_mb": _vm("VmHWM") - rss0}
        out.update(train_record(config, res), base_untouched_by_training=bits_equal())
        if method == "lora":
            n_params = res.n_params  # every sparse method gets LoRA's parameter count
        with tempfile.TemporaryDirectory() as tmp:
            out["adapter_bytes"] = save_adapter(res.adapter, Path(tmp) / "adapter.safetensors").stat().st_size
        out["merge_unmerge_ms"] = merge_unmerge_ms(model, res.adapter)
        out["bit_exact"] = bits_equal()
        record = merge_adapter_(model, res.adapter)
        after = _linear_zeros(model)
        out["zeros_kept"] = all(torch.equal(after[n], z) for n, z in zeros.items())
        out["linear_sparsity"] = sum(int(z.sum()) for z in after.values()) / sum(z.numel() for z in after.values())
        out.update(target_ppl=ppl(held), embedded_ppl=ppl(forget))
        if sparse_runtime:
            out["sparse_runtime"] = runtime_probe(model, held[: 2 * args.seq_len], args.seq_len, ppl)
        unmerge_adapter_(model, record)
        out["bit_exact_after_eval"] = bits_equal()
        print({k: v for k, v in out.items() if k != "config"}, flush=True)
        rows.append(out)
        Path(args.child_out).write_text(json.dumps(rows))  # partial rows survive an interruption
    return rows


def run_child(args: argparse.Namespace, model: str, methods: list[str], sparse_runtime: bool) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--child", ",".join(methods), "--child-out", path, "--model", model]
    for key in (
        "steps",
        "seq_len",
        "batch_size",
        "budget",
        "lr",
        "eval_windows",
        "train_chars",
        "eval_chars",
        "threads",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if sparse_runtime:
        cmd.append("--sparse-runtime")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    rows = json.loads(Path(path).read_text()) if Path(path).stat().st_size else []
    Path(path).unlink()
    if proc.returncode:
        print(f"child for {model} failed (exit {proc.returncode}); keeping its {len(rows)} finished rows", flush=True)
    return rows


def markdown(data: dict) -> str:
    a = data["args"]
    lines = [
        "# Sparse fine-tuning vs LoRA (`benchmarks/bench_peft.py`)",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Model {a['model']}; target domain: the standard library's sources (train split; held-out eval split, "
        f"{a['eval_windows']} x {a['seq_len']} tokens); forgetting: the embedded text's evaluation part "
        f"({a['eval_windows']} x {a['seq_len']} tokens). Every method: {a['steps']} steps x {a['batch_size']} x "
        f"{a['seq_len']} tokens (the same windows in the same order), AdamW lr {a['lr']}, 5% warm-up + cosine, "
        f"{a['threads']} torch thread(s). "
        "This is a short equal budget on a shared 2-core machine, not the issue's 30 CPU-minutes per method. "
        "Times are wall-clock on that shared machine; 'train peak MB' is the peak RSS during training above "
        "the RSS before it (the loaded model and data).",
        "",
    ]
    for part, rows in data["parts"].items():
        base = next((r for r in rows if r["method"] == "base"), None)
        if base is None:
            continue
        lines += [
            f"## {part}",
            "",
            f"Before fine-tuning: target perplexity {base['target_ppl']:.3f}, embedded {base['embedded_ppl']:.3f}.",
            "",
        ]
        head = (
            "| method | trainable | adapter bytes | x LoRA bytes | target ppl | embedded ppl (forgetting) "
            "| train peak MB | train s | merge+unmerge ms | bit-exact | zeros kept |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        lora = next((r for r in rows if r["method"] == "lora"), None)
        for r in rows:
            if r["method"] == "base":
                continue
            ratio = r["adapter_bytes"] / lora["adapter_bytes"] if lora else float("nan")
            lines.append(
                f"| {r['method']} | {r['trainable_params']} | {r['adapter_bytes']} | {ratio:.2f} "
                f"| {r['target_ppl']:.3f} | {r['embedded_ppl']:.3f} | {r['train_peak_extra_mb']:.0f} "
                f"| {r['train_seconds']:.0f} | {r['merge_unmerge_ms']:.1f} | {r['bit_exact']} | {r['zeros_kept']} |"
            )
        if lora and lora.get("peft_lora_bytes"):
            lines += [
                "",
                f"peft's own LoRA file (adapter_model.safetensors): {lora['peft_lora_bytes']} bytes; "
                "'x LoRA bytes' divides by sparseland's file of the same LoRA (A, B in float32).",
            ]
        lines.append("")
    if "recovery" in data:
        lines += [
            "## Pruned model: recovery of the masked-LoRA gap",
            "",
            data["recovery"]["note"],
            "",
            "| method | target ppl | recovered fraction of the gap |",
            "|---|---|---|",
        ]
        for m, v in data["recovery"]["methods"].items():
            lines.append(f"| {m} | {v['target_ppl']:.3f} | {v['recovered']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for part, rows in data["parts"].items():
        for r in rows:
            if r["method"] == "base":
                ax.axhline(r["target_ppl"], ls=":", lw=0.8, color="grey")
                continue
            ax.scatter(r["trainable_params"], r["target_ppl"], marker="s" if r["method"] == "lora" else "o")
            ax.annotate(f"{r['method']} ({part})", (r["trainable_params"], r["target_ppl"]), fontsize=7)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("target-domain perplexity (stdlib eval split)")
    ax.set_title("target perplexity vs trainable parameters (dotted: before fine-tuning)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pruned", default=None, help="a 50%% pruned checkpoint for the sparsity-preserving part")
    p.add_argument("--methods", default=",".join(DENSE_METHODS))
    p.add_argument("--pruned-methods", default=",".join(PRUNED_METHODS))
    p.add_argument(
        "--wait-pruned", action="store_true", help="wait for --pruned's checkpoint to appear (prune running)"
    )
    p.add_argument("--parts", default="dense,pruned", help="which parts to run (dense, pruned)")
    p.add_argument("--dense-results", default=None, help="JSON of a dense run, for the recovery when --parts pruned")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.003)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--train-chars", type=int, default=600_000)
    p.add_argument("--eval-chars", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared, busy machine)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--stem", default="peft")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sparse-runtime", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        run_part(args, args.model, args.child.split(","), args.sparse_runtime)
        return

    from sparseland.io import write_results

    command = "python benchmarks/bench_peft.py " + " ".join(sys.argv[1:])
    data: dict = {"command": command, "args": vars(args), "parts": {}}
    parts = [("dense", args.model, args.methods.split(","), False)] if "dense" in args.parts else []
    if args.pruned and "pruned" in args.parts:
        parts.append(("pruned-50%", args.pruned, args.pruned_methods.split(","), True))
    for part, model, methods, runtime in parts:
        if part != "dense" and args.wait_pruned:  # the checkpoint is being written by a prune started alongside
            while not (Path(model) / "sparseland.json").is_file():
                time.sleep(10)
        data["parts"][part] = run_child(args, model, methods, runtime)
        write_results(args.out, args.stem, data, markdown(data))  # partial results survive an interruption
    dense_rows = data["parts"].get("dense")
    if dense_rows is None and args.dense_results and Path(args.dense_results).is_file():
        dense_rows = json.loads(Path(args.dense_results).read_text())["parts"].get("dense")
        data["dense_results"] = args.dense_results
    dense_lora = next((r for r in dense_rows or [] if r["method"] == "lora"), None)
    prows = {r["method"]: r for r in data["parts"].get("pruned-50%", [])}
    if dense_lora and "lora" in prows:
        masked, ref = prows["lora"]["target_ppl"], dense_lora["target_ppl"]
        gap = masked - ref
        data["recovery"] = {
            "note": f"gap = masked-LoRA target ppl on the pruned model ({masked:.3f}) - LoRA on the dense model "
            f"({ref:.3f}) = {gap:.3f}; recovered = (masked LoRA - method) / gap (target: >= 0.5).",
            "methods": {
                m: {
                    "target_ppl": r["target_ppl"],
                    "recovered": (masked - r["target_ppl"]) / gap if gap else float("nan"),
                }
                for m, r in prows.items()
                if m not in ("base", "lora")
            },
        }
    write_results(args.out, args.stem, data, markdown(data))
    plot(data, Path(args.out) / f"{args.stem}.png")


if __name__ == "__main__":
    main()
