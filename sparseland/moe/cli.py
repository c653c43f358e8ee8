"""``sparseland moefy``: turn the dense MLPs into experts with a router, saved as a checkpoint.

sparseland moefy --model smollm2-135m --experts 16 --active 0.5 --construction cmoe --eval --out moe/
sparseland moefy --router learned --recover-steps 40 --eval --out moe-rec/   # + distillation from dense
"""

from __future__ import annotations

import argparse
import json

from sparseland.cli import add_data_args, add_model_args, check_new_dir, load_with_calibration, positive_int
from sparseland.cliargs import bounded


def build_config(args: argparse.Namespace):
    from sparseland.moe import MoEfyConfig

    return MoEfyConfig(
        experts=args.experts,
        active=args.active,
        construction=args.construction,
        shared_experts=args.shared_experts,
        router=args.router,
        routing=args.routing,
        chunk=args.chunk,
        calib_tokens=args.calib_tokens,
        seed=args.seed,
    )


def _moefy_command(args: argparse.Namespace) -> int:
    config = build_config(args)  # validate before the slow model load
    check_new_dir(args.out)
    from sparseland import sparsify_
    from sparseland.runtime.checkpoint import checkpoint_bytes, save_sparse_checkpoint

    model, tokenizer, corpus, calib, load_s = load_with_calibration(args, True)
    teacher = None
    if args.recover_steps:
        import copy

        teacher = copy.deepcopy(model)
    report = sparsify_(model, config, calibration=calib)
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    print(
        f"moefied     {report.layers} MLPs into {config.experts} experts ({config.n_shared} shared), "
        f"{config.construction} construction, {config.router} router, {config.routing} routing"
    )
    print(
        f"active      {mean(report.calib_active):.3f} of the MLP neurons per token on calibration tokens "
        f"(budget {config.active}); router weights {report.router_weight_fraction:.2%} of the MLP's"
    )
    print(f"router      recall of the top-output-norm experts {mean(report.router_recall):.3f}")
    print(f"time        load {load_s:.1f} s, moefy {report.seconds:.1f} s")
    meta: dict = {"method": config.to_dict(), "report": report.to_dict(), "model": args.model}
    meta["calibration"] = {"text": corpus.name, "samples": args.calib_samples, "seq_len": args.seq_len}
    if args.recover_steps:
        from sparseland.moe.recover import recover_

        windows = corpus.calibration(args.calib_samples, args.seq_len, args.seed + 1)
        rec = recover_(
            model,
            teacher,
            windows,
            args.recover_steps,
            lr=args.lr,
            max_seconds=args.recover_minutes * 60 if args.recover_minutes else None,
        )
        print(
            f"recovery    {rec.steps} distillation steps in {rec.seconds:.0f} s "
            f"(loss {rec.losses[0]['total']:.4f} -> {rec.losses[-1]['total']:.4f})"
        )
        meta["recovery"] = {"steps": rec.steps, "seconds": rec.seconds, "lr": args.lr, "losses": rec.losses}
    if args.eval:
        from sparseland.evaluate import perplexity
        from sparseland.moe import moe_layers

        for m in moe_layers(model).values():
            m.reset_stats()
        windows = corpus.evaluation(args.seq_len, args.max_windows)
        res = perplexity(model, windows, seq_len=args.seq_len, batch_size=args.batch_size)
        act = mean([m.active_fraction() for m in moe_layers(model).values()])
        print(
            f"perplexity  {res.perplexity:.3f} on {res.n_windows} x {res.seq_len} evaluation tokens "
            f"({act:.3f} of the MLP neurons active)"
        )
        meta["eval"] = {"perplexity": res.perplexity, "windows": res.n_windows, "active": act}
    path = save_sparse_checkpoint(model, tokenizer, args.out, metadata=json.loads(json.dumps(meta)))
    print(f"saved       {path} ({checkpoint_bytes(path) / 1e6:.1f} MB)")
    return 0


_fraction_open = bounded(float, lo=0, hi=1, lo_open=True, name="fraction", hint="pass a fraction such as 0.5")


def add_commands(subparsers) -> None:
    from sparseland.moe.config import CONSTRUCTIONS, ROUTERS, ROUTINGS

    p = subparsers.add_parser("moefy", help="MoE-fication: split the dense MLPs into experts with a router")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--experts", type=positive_int, default=16, help="experts per MLP (default: %(default)s)")
    p.add_argument(
        "--active",
        type=_fraction_open,
        default=0.5,
        help="fraction of the MLP neurons active per token, shared included (default: %(default)s)",
    )
    p.add_argument(
        "--construction",
        choices=CONSTRUCTIONS,
        default="cmoe",
        help="cmoe: shared experts + balanced k-means of activation markers; kmeans: balanced k-means "
        "of co-activation; random: random split (default: %(default)s)",
    )
    p.add_argument(
        "--shared-experts", type=int, default=None, help="always-on experts (default: 2 for cmoe, 0 otherwise)"
    )
    p.add_argument(
        "--router",
        choices=ROUTERS,
        default="analytic",
        help="analytic: training-free from the cluster representatives; learned: a small MLP trained "
        "on calibration tokens (default: %(default)s)",
    )
    p.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="topk",
        help="topk per token or a per-layer calibrated threshold (default: %(default)s)",
    )
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=1,
        help="decode: keep a token's experts for this many tokens (BlockFFN reuse; default: %(default)s)",
    )
    p.add_argument("--calib-samples", type=positive_int, default=16, help="calibration windows (default: %(default)s)")
    p.add_argument(
        "--calib-tokens",
        type=positive_int,
        default=4096,
        help="tokens sampled from them for clustering and routers (default: %(default)s)",
    )
    p.add_argument(
        "--recover-steps",
        type=int,
        default=0,
        help="distillation steps from the dense model after MoE-fication (default: none)",
    )
    p.add_argument("--recover-minutes", type=float, default=None, help="stop the recovery after this wall time")
    p.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and clustering")
    p.add_argument("--eval", action="store_true", help="print the perplexity (and measured active fraction)")
    p.add_argument("--out", required=True, help="output directory of the checkpoint")
    p.set_defaults(func=_moefy_command)
