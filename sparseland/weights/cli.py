"""``sparseland prune``: post-training weight pruning of a model, saved as a sparse checkpoint."""

from __future__ import annotations

import argparse
import json

from sparseland.cli import (
    add_calibration_args,
    add_data_args,
    add_model_args,
    calibration_from_args,
    check_new_dir,
    positive_int,
)
from sparseland.cliargs import bounded
from sparseland.errors import SparselandError

METHODS = ("magnitude", "random", "wanda", "sparsegpt")


_fraction = bounded(float, name="fraction", hint="pass a fraction such as 0.5")  # the config checks the range


def build_config(args: argparse.Namespace):
    from sparseland.weights import DSnoTConfig, MagnitudeConfig, RandomConfig, SparseGPTConfig, WandaConfig

    common = dict(
        sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation, seed=args.seed, quant=args.quant
    )
    if args.refine == "dsnot":
        return DSnoTConfig(init=args.method, **common)
    cls = {
        "magnitude": MagnitudeConfig,
        "random": RandomConfig,
        "wanda": WandaConfig,
        "sparsegpt": SparseGPTConfig,
    }
    return cls[args.method](**common)


def _prune_command(args: argparse.Namespace) -> int:
    config = build_config(args)  # validate before the slow model load
    if args.quant_embeddings:
        from sparseland.quant import QuantScheme

        QuantScheme.parse(args.quant_embeddings)
    if args.resume and not args.offload:
        raise SparselandError("--resume continues an interrupted --offload run; add --offload")
    if args.offload:
        return _prune_offload_command(args, config)
    check_new_dir(args.out)
    from sparseland import sparsify_

    if args.calib_text is not None:
        from sparseland.data.text import read_text_file

        read_text_file(args.calib_text)  # a bad file fails before the slow model load
    import time

    from sparseland.data import load_corpus
    from sparseland.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    corpus = load_corpus(tokenizer, args.text)
    calib, calib_info = (
        calibration_from_args(args, model, tokenizer, corpus) if config.uses_calibration else (None, None)
    )
    report = sparsify_(model, config, calibration=calib)
    if args.quant_embeddings:
        from sparseland.quant import quantize_embeddings_

        quantize_embeddings_(model, args.quant_embeddings)
    print(f"pruned      {config.kind} {config.pattern} target {config.sparsity:.4g} ({config.allocation})")
    print(
        f"sparsity    {report.overall_sparsity:.4f} of the decoder-block Linear weights "
        "(lm_head and embeddings stay dense)"
    )
    if config.quant:
        print(f"quantized   the kept weights to {config.quant}" + (" (jointly)" if config.kind == "sparsegpt" else ""))
    print(f"time        load {load_s:.1f} s, prune {report.seconds:.1f} s")
    if args.eval:
        from sparseland.evaluate import perplexity

        windows = corpus.evaluation(args.seq_len, args.max_windows)
        res = perplexity(model, windows, seq_len=args.seq_len, batch_size=args.batch_size)
        print(f"perplexity  {res.perplexity:.3f} on {res.n_windows} x {res.seq_len} evaluation tokens")
    from sparseland.runtime.checkpoint import save_sparse_checkpoint  # lazily: another area's module

    metadata = {
        "method": config.to_dict(),
        "report": report.to_dict(),
        "model": args.model,
        "calibration": calib_info,
    }
    path = save_sparse_checkpoint(model, tokenizer, args.out, metadata=json.loads(json.dumps(metadata)))
    print(f"saved       {path}")
    return 0


def _prune_offload_command(args: argparse.Namespace, config) -> int:
    """``--offload``: block by block from the model directory's shards; the checkpoint is written as it goes."""
    if args.eval or args.quant_embeddings:
        flag = "--eval" if args.eval else "--quant-embeddings"
        raise SparselandError(
            f"{flag} needs the whole model in memory and is not available with --offload; run "
            f"`sparseland eval --model {args.out}` on the checkpoint afterwards, or drop --offload"
        )
    if not args.resume:
        check_new_dir(args.out)
    from sparseland.data import load_corpus
    from sparseland.weights.offload import load_config, model_dir_of, prune_offload

    model_dir = model_dir_of(args.model)
    load_config(model_dir)  # a directory without a model fails here, before the tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise SparselandError(
            f"{model_dir} has no loadable tokenizer ({type(exc).__name__}); the CLI makes calibration windows "
            "with it: save the tokenizer next to the model, or call sparseland.weights.offload.prune_offload "
            "with a calibration tensor"
        ) from exc
    corpus = load_corpus(tokenizer, args.text)
    calib = corpus.calibration(args.calib_samples, args.seq_len, args.seed) if config.uses_calibration else None
    metadata = {
        "method": config.to_dict(),
        "model": args.model,
        "calibration": {"text": corpus.name, "samples": args.calib_samples, "seq_len": args.seq_len},
        "offload": {"calib_batch": args.calib_batch},
    }
    report = prune_offload(
        model_dir,
        config,
        args.out,
        calib,
        calib_batch=args.calib_batch,
        resume=args.resume,
        tokenizer=tokenizer,
        metadata=metadata,
    )
    print(f"pruned      {config.kind} {config.pattern} target {config.sparsity:.4g} out of core")
    print(f"sparsity    {report.overall_sparsity:.4f} of the decoder-block Linear weights")
    if report.resumed_from:
        print(f"resumed     from block {report.resumed_from}")
    per = report.block_seconds
    if per:
        print(f"time        {report.seconds:.1f} s; per block {min(per):.2f}-{max(per):.2f} s")
    print(f"peak RSS    {report.peak_rss_mb:.0f} MiB")
    print(f"saved       {args.out} ({report.checkpoint_bytes / 2**20:.1f} MiB)")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("prune", help="post-training weight pruning (magnitude, random, Wanda, SparseGPT)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--method", choices=METHODS, default="wanda", help="pruning method (default: %(default)s)")
    p.add_argument(
        "--sparsity",
        type=_fraction,
        default=0.5,
        help="fraction of weights set to zero, in [0, 1) (default: 0.5)",
    )
    p.add_argument(
        "--pattern",
        default="unstructured",
        help="'unstructured' or N:M, keep N of every M, e.g. 2:4 (default: %(default)s)",
    )
    p.add_argument("--allocation", choices=("uniform", "owl"), default="uniform", help="per-layer sparsity allocation")
    p.add_argument("--refine", choices=("dsnot",), default=None, help="refine the mask training-free with DSnoT")
    p.add_argument(
        "--calib-samples",
        type=positive_int,
        default=32,
        help="calibration windows of --seq-len tokens (default: %(default)s)",
    )
    add_calibration_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and random pruning")
    p.add_argument(
        "--quant",
        default=None,
        help="also quantize the kept weights, e.g. int4-g64 (jointly inside SparseGPT's OBS loop; after pruning, "
        "round to nearest, for the other methods)",
    )
    p.add_argument(
        "--quant-embeddings", default=None, help="quantize the embeddings (and the tied lm_head) too, e.g. int8"
    )
    p.add_argument("--eval", action="store_true", help="print the perplexity after pruning")
    p.add_argument(
        "--offload",
        action="store_true",
        help="prune out of core: one decoder block in memory at a time, read from the model directory's "
        "safetensors shards, activations in a disk buffer, the checkpoint written block by block",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --offload: continue the run that was interrupted writing --out (its <out>.partial directory)",
    )
    p.add_argument(
        "--calib-batch",
        type=positive_int,
        default=8,
        help="with --offload: calibration windows per micro-batch of the statistics (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="output directory of the sparse checkpoint")
    p.set_defaults(func=_prune_command)


__all__ = ["SparselandError", "add_commands", "build_config"]
