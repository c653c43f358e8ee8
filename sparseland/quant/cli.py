"""``sparseland quantize``: quantize a model's weights (round to nearest or GPTQ), saved as a checkpoint.

sparseland quantize --model smollm2-135m --scheme int4-g32 --out q4/
sparseland quantize --model pruned/ --scheme int4-g64 --method gptq --out pruned-q4/   # keeps the zeros
"""

from __future__ import annotations

import argparse
import json

from sparseland.cli import add_data_args, add_model_args, check_new_dir, load_with_calibration, positive_int

SCHEME_HELP = (
    "int4-g32 (asymmetric, groups of 32 columns: llama.cpp's Q4_1 grid), int4-g64, int4-g128, "
    "'-sym' for symmetric (Q4_0 style), int8 (symmetric per output channel)"
)


def build_config(args: argparse.Namespace):
    from sparseland.quant import QuantConfig

    return QuantConfig(scheme=args.scheme, method=args.method, embeddings=args.embeddings)


def _quantize_command(args: argparse.Namespace) -> int:
    config = build_config(args)  # validate before the slow model load
    check_new_dir(args.out)
    from sparseland import sparsify_
    from sparseland.runtime.checkpoint import checkpoint_bytes, save_sparse_checkpoint

    model, tokenizer, corpus, calib, load_s = load_with_calibration(args, config.needs_calibration)
    report = sparsify_(model, config, calibration=calib)
    print(f"quantized   {report.layers} Linear weights to {report.scheme} ({report.method})", end="")
    print(f", {report.sparse_layers} of them sparse (zeros kept as a mask)" if report.sparse_layers else "")
    print(f"storage     {report.bits_per_weight:.3f} bits per weight (codes + scales + masks)")
    if config.embeddings:
        print(f"embeddings  {config.embeddings} (the tied lm_head with them)")
    print(f"time        load {load_s:.1f} s, quantize {report.seconds:.1f} s")
    if args.eval:
        from sparseland.evaluate import perplexity

        windows = corpus.evaluation(args.seq_len, args.max_windows)
        res = perplexity(model, windows, seq_len=args.seq_len, batch_size=args.batch_size)
        print(f"perplexity  {res.perplexity:.3f} on {res.n_windows} x {res.seq_len} evaluation tokens")
    metadata = {"method": config.to_dict(), "report": report.to_dict(), "model": args.model}
    if calib is not None:
        metadata["calibration"] = {"text": corpus.name, "samples": args.calib_samples, "seq_len": args.seq_len}
    path = save_sparse_checkpoint(model, tokenizer, args.out, metadata=json.loads(json.dumps(metadata)))
    print(f"saved       {path} ({checkpoint_bytes(path) / 1e6:.1f} MB)")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize weights to 4 or 8 bits (round to nearest or GPTQ)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--scheme", default="int4-g32", help=f"{SCHEME_HELP} (default: %(default)s)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="quantizer (default: %(default)s)")
    p.add_argument(
        "--embeddings",
        default=None,
        help="also quantize the embeddings and the lm_head tied to them with this scheme: int8-g32 (llama.cpp's "
        "Q8_0 grid; the embedded model's exactly) or int4-g32 (smaller, faster, less exact) (default: keep them "
        "in float)",
    )
    p.add_argument(
        "--calib-samples", type=positive_int, default=32, help="GPTQ calibration windows (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--eval", action="store_true", help="print the perplexity after quantizing")
    p.add_argument("--out", required=True, help="output directory of the checkpoint")
    p.set_defaults(func=_quantize_command)
