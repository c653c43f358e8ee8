"""MoE-fication of the embedded model: perplexity vs active MLP fraction per construction and router,
against CATS / TEAL at the same fraction of MLP weight reads, and the MoE MLP decode kernel's speed
against the dense MLP kernels, interleaved.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_moe.py quality --windows 16 --out moe
    flock /tmp/sparseland-heavy.lock python benchmarks/bench_moe.py speed --rounds 15 --out moe_speed

quality: for each active fraction and construction (cmoe, kmeans, random) with the training-free
analytic router, the learned router at the listed fractions, CATS and TEAL (on the MLP sites only)
at the sparsity whose measured MLP weight reads equal the fraction, and router training + recovery
(distillation from dense, a wall-time budget) for the chosen construction. MLP read fraction of a MoE
= measured active neurons + router weights, over the MLP's weights.
speed: one decode token through 30 MLPs of the real shapes (distinct weights per layer: no cache
reuse), median over interleaved rounds: dense (3 dense_mm calls, the runtime's dense kernel), the MoE
kernel with every expert, and at 75/50/25% active (2 shared + random routed experts per token);
then end-to-end greedy decode of the MoE-fied model vs dense, side by side.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparseland import sparsify_  # noqa: E402
from sparseland.io import write_results  # noqa: E402
from sparseland.moe import MoEfyConfig, moe_layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _ppl(model, ev, seq_len: int) -> float:
    from sparseland.evaluate import perplexity

    return perplexity(model, ev, seq_len=seq_len, batch_size=4, progress=False).perplexity


def moe_row(base, calib, ev, seq_len, cfg: MoEfyConfig, inputs, recover: dict | None = None) -> dict:
    from sparseland.moe.apply import moefy_model

    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    rep = moefy_model(model, cfg, calib, progress=False, inputs=inputs)
    row = {"method": f"moe-{cfg.construction}-{cfg.router}", "target": cfg.active, "build_s": time.perf_counter() - t0}
    if recover:
        from sparseland.moe.recover import recover_

        res = recover_(
            model,
            base,
            recover["windows"],
            recover["steps"],
            lr=recover["lr"],
            batch_size=recover["batch"],
            max_seconds=recover["seconds"],
            progress=False,
        )
        row.update(method=row["method"] + "+recovery", recovery_steps=res.steps, recovery_s=res.seconds)
    layers = list(moe_layers(model).values())
    for m in layers:
        m.reset_stats()
    row["ppl"] = _ppl(model, ev, seq_len)
    active = statistics.mean(m.active_fraction() for m in layers)
    row.update(
        active=active, reads=active + rep.router_weight_fraction, router_recall=statistics.mean(rep.router_recall)
    )
    return row


def act_row(base, calib, ev, seq_len, method: str, sparsity: float) -> dict:
    from sparseland.activations import CATSConfig, TEALConfig, measure_sparsity

    model = copy.deepcopy(base)
    cfg = (
        CATSConfig(sparsity=sparsity)
        if method == "cats"
        else TEALConfig(sparsity=sparsity, targets=("gate", "up", "down"))
    )
    sparsify_(model, cfg, calibration=calib)
    ppl = _ppl(model, ev, seq_len)
    meas = measure_sparsity(model, ev[:1])
    reads = []
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}.mlp."
        if method == "cats":
            reads.append((1 + 2 * (1 - meas.get(p + "gate_proj", 0.0))) / 3)
        else:
            reads.append(sum(1 - meas.get(p + n, 0.0) for n in ("gate_proj", "up_proj", "down_proj")) / 3)
    return {"method": method, "target": sparsity, "ppl": ppl, "active": None, "reads": statistics.mean(reads)}


def jobs(args) -> list[tuple]:
    """(kind, fraction, construction or method, router) in priority order: 50% first."""
    fr = sorted((float(f) for f in args.fractions.split(",")), key=lambda f: abs(f - 0.5))
    out = []
    for f in fr:
        out += [("moe", f, c, "analytic") for c in args.constructions.split(",") if c]
        out += [
            ("moe", f, c, "learned")
            for c in (args.learned.split(",") if args.learned else [])
            if f == 0.5 or args.learned_all
        ]
        if args.no_baselines:
            continue
        if 1.5 * (1 - f) < 1:  # CATS keeps the gate dense: reads >= 1/3
            out.append(("act", 1.5 * (1 - f), "cats", None))
        out.append(("act", 1 - f, "teal", None))
    if args.recover_minutes > 0:
        out.append(("recover", 0.5, args.recover_construction, "learned"))
    return out


def quality(args) -> int:
    from sparseland.data import load_corpus
    from sparseland.models import load_model
    from sparseland.moe.apply import capture_mlp_inputs

    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2-135m")
    corpus = load_corpus(tok)
    calib = corpus.calibration(args.calib, args.seq_len, 0)
    ev = corpus.evaluation(args.seq_len, args.windows)
    t0 = time.perf_counter()
    inputs = capture_mlp_inputs(base, base.model.layers, calib, MoEfyConfig().calib_tokens, 0)
    capture_s = time.perf_counter() - t0
    out = {
        "command": " ".join(["python benchmarks/bench_moe.py", *sys.argv[1:]]),
        "threads": args.threads,
        "eval_tokens": int(ev.numel()),
        "calib_tokens": int(calib.numel()),
        "capture_s": capture_s,
        "dense_ppl": _ppl(base, ev, args.seq_len),
        "rows": [],
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    print("dense", out["dense_ppl"], flush=True)
    for kind, f, name, router in jobs(args):
        if kind == "act":
            row = act_row(base, calib, ev, args.seq_len, name, f)
        else:
            rec = None
            if kind == "recover":
                rec = {
                    "windows": corpus.calibration(args.recover_windows, args.recover_seq_len, 1),
                    "steps": args.recover_steps,
                    "lr": args.lr,
                    "seconds": args.recover_minutes * 60,
                    "batch": args.recover_batch,
                }
            row = moe_row(
                base, calib, ev, args.seq_len, MoEfyConfig(active=f, construction=name, router=router), inputs, rec
            )
        row["ppl_ratio"] = row["ppl"] / out["dense_ppl"]
        out["rows"].append(row)
        print(row, flush=True)
        write_results(RESULTS, args.out, out, quality_md(out))  # after every row: a partial run keeps its rows
    print(quality_md(out))
    return 0


def quality_md(out: dict) -> str:
    lines = [
        "# MoE-fication: perplexity vs active MLP fraction (SmolLM2-135M)",
        "",
        f"Command: `{out['command']}` (not under the heavy-job lock: see docs/results.md)",
        "",
        f"Dense perplexity {out['dense_ppl']:.3f} on {out['eval_tokens']} evaluation tokens; calibration "
        f"{out['calib_tokens']} tokens (MoE: up to 4096 of them per layer). 16 experts per MLP "
        "(96 neurons each); cmoe has 2 shared experts. `active`: measured fraction of MLP neurons that ran; "
        "`reads`: fraction of the MLP's weights a decode step reads (active neurons + router; for CATS/TEAL from "
        "the measured activation sparsity on 1 evaluation window).",
        "",
        "| method | target | active | MLP reads | perplexity | x dense | router recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        act = f"{r['active']:.3f}" if r.get("active") is not None else "-"
        rec = f"{r['router_recall']:.3f}" if "router_recall" in r else "-"
        extra = f" ({r['recovery_steps']} steps, {r['recovery_s']:.0f} s)" if "recovery_steps" in r else ""
        lines.append(
            f"| {r['method']}{extra} | {r['target']:.3f} | {act} | {r['reads']:.3f} | {r['ppl']:.3f} "
            f"| {r['ppl_ratio']:.3f} | {rec} |"
        )
    return "\n".join(lines) + "\n"


def _mlp_weights(layers: int, H: int, I: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        wg, wu = torch.randn(I, H, generator=g) * 0.02, torch.randn(I, H, generator=g) * 0.02
        wd = torch.randn(H, I, generator=g) * 0.02
        out.append((wg, wu, wd, wd.t().contiguous()))
    return out


def speed(args) -> int:
    from sparseland.runtime import kernels

    if args.load_library:  # a separately built library holding the moe_mlp op (with dense_mm from _C)
        kernels.extension_available()
        torch.ops.load_library(args.load_library)
    if not kernels.extension_available() or not hasattr(torch.ops.sparseland, "moe_mlp"):
        raise SystemExit("the C++ extension with moe_mlp is not built: python setup.py build_ext --inplace")
    torch.set_num_threads(args.threads)
    H, I, E, S = 576, 1536, 16, 2
    size = I // E
    ws = _mlp_weights(30, H, I)
    x = torch.randn(1, H)
    g = torch.Generator().manual_seed(1)

    def segs_for(active: float) -> torch.Tensor:
        k = round(active * E) - S
        chosen = sorted((torch.randperm(E - S, generator=g)[:k] + S).tolist())
        runs = [[0, S * size]]
        for e in chosen:
            if runs[-1][1] == e * size:
                runs[-1][1] += size
            else:
                runs.append([e * size, (e + 1) * size])
        return torch.tensor(runs, dtype=torch.long)

    def dense_token():
        for wg, wu, wd, _ in ws:
            h = torch.nn.functional.silu(torch.ops.sparseland.dense_mm(wg, x)) * torch.ops.sparseland.dense_mm(wu, x)
            torch.ops.sparseland.dense_mm(wd, h)

    def moe_token(active):
        segs = [segs_for(active) for _ in ws]  # routed experts differ per layer and token

        def run():
            for (wg, wu, _, wdt), s in zip(ws, segs, strict=True):
                torch.ops.sparseland.moe_mlp(x, wg, wu, wdt, s)

        return run

    variants = {"dense (3 x dense_mm)": lambda: dense_token}
    for a in (1.0, 0.75, 0.5, 0.25):
        variants[f"moe kernel {a:.0%} active"] = lambda a=a: moe_token(a)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.rounds + 1):
        for name, make in variants.items():
            fn = make()
            t0 = time.perf_counter()
            fn()
            if rnd:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["dense (3 x dense_mm)"])
    rows = [
        {
            "variant": k,
            "ms_per_token_30_mlps": statistics.median(v) * 1e3,
            "x_dense": statistics.median(v) / base,
            "gbs": 30
            * 3
            * H
            * I
            * 4
            * (1.0 if "dense" in k or "100%" in k else float(k.split()[2][:-1]) / 100)
            / statistics.median(v)
            / 1e9,
        }
        for k, v in times.items()
    ]
    e2e = end_to_end(args) if args.e2e_rounds > 0 else []
    out = {
        "command": " ".join(["python benchmarks/bench_moe.py", *sys.argv[1:]]),
        "threads": args.threads,
        "rounds": args.rounds,
        "kernel": rows,
        "end_to_end": e2e,
    }
    write_results(RESULTS, args.out, out, speed_md(out))
    print(speed_md(out))
    return 0


def end_to_end(args) -> list[dict]:
    """Greedy decode, interleaved: dense with the fused step, dense with the Python step, MoE-fied
    (Python step with the MoE kernel) at 50% active."""
    from sparseland.data import load_corpus
    from sparseland.models import load_model
    from sparseland.runtime import greedy_generate

    base, tok = load_model("smollm2-135m")
    corpus = load_corpus(tok)
    moe = copy.deepcopy(base)
    sparsify_(moe, MoEfyConfig(active=0.5, construction="cmoe"), calibration=corpus.calibration(4, 256, 0))
    prompt = corpus.evaluation(64, 1)[:1]
    runs = {"dense, fused step": (base, "0"), "dense, Python step": (base, "1"), "moe 50%, Python step": (moe, "1")}
    per: dict[str, list[float]] = {k: [] for k in runs}
    toks = {}
    for rnd in range(args.e2e_rounds + 1):
        for name, (m, nofast) in runs.items():
            os.environ["SPARSELAND_NO_FASTPATH"] = nofast
            r = greedy_generate(m, prompt, args.new_tokens, stop_at_eos=False)
            if rnd:
                per[name] += r.per_token_seconds
            toks[name] = r.tokens
    os.environ.pop("SPARSELAND_NO_FASTPATH", None)
    base_t = statistics.median(per["dense, Python step"])
    return [
        {
            "variant": k,
            "tokens_per_s": 1 / statistics.median(v),
            "x_dense_python": statistics.median(v) / base_t,
            "same_tokens_as_dense": toks[k] == toks["dense, fused step"],
        }
        for k, v in per.items()
    ]


def speed_md(out: dict) -> str:
    lines = [
        "# MoE MLP decode kernel vs the dense MLP kernel",
        "",
        f"Command: `{out['command']}` (not under the heavy-job lock: see docs/results.md)",
        "",
        f"One decode token through 30 MLPs of SmolLM2-135M's shape (576 -> 1536 -> 576, fp32, distinct random "
        f"weights per layer), {out['rounds']} interleaved rounds, median, {out['threads']} thread(s). The MoE "
        "kernel reads 2 shared + random routed experts of 16 (96 neurons each) per layer.",
        "",
        "| variant | ms / token (30 MLPs) | x dense | GB/s |",
        "|---|---:|---:|---:|",
    ]
    for r in out["kernel"]:
        lines.append(f"| {r['variant']} | {r['ms_per_token_30_mlps']:.3f} | {r['x_dense']:.3f} | {r['gbs']:.1f} |")
    if not out["end_to_end"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "End-to-end greedy decode (64-token prompt), interleaved:",
        "",
        "| variant | tokens/s | time x dense Python step | same tokens as dense |",
        "|---|---:|---:|---|",
    ]
    for r in out["end_to_end"]:
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['x_dense_python']:.3f} | {r['same_tokens_as_dense']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--fractions", default="0.25,0.5,0.75")
    q.add_argument("--constructions", default="cmoe,kmeans,random")
    q.add_argument("--learned", default="cmoe,random", help="constructions to also run with the learned router")
    q.add_argument("--windows", type=int, default=4)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--calib", type=int, default=4)
    q.add_argument("--recover-construction", default="cmoe")
    q.add_argument("--recover-minutes", type=float, default=0.0)
    q.add_argument("--recover-steps", type=int, default=200)
    q.add_argument("--recover-windows", type=int, default=64)
    q.add_argument("--recover-seq-len", type=int, default=256)
    q.add_argument("--recover-batch", type=int, default=2)
    q.add_argument("--no-baselines", action="store_true", help="skip CATS and TEAL")
    q.add_argument(
        "--learned-all", action="store_true", help="the learned router at every fraction (default: 50%% only)"
    )
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--out", default="moe")
    q.set_defaults(func=quality)
    s = sub.add_parser("speed")
    s.add_argument("--rounds", type=int, default=15)
    s.add_argument("--e2e-rounds", type=int, default=3)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", default="moe_speed")
    s.add_argument("--load-library", default=None, help="a .so with the moe_mlp op, if _C lacks it")
    s.set_defaults(func=speed)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
