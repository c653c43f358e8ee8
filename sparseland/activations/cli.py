"""``sparseland activations``: calibrate an activation-sparsity method, report perplexity vs dense.

    sparseland activations --method teal --sparsity 0.4 --save teal40.safetensors

Registered by adding ``"sparseland.activations.cli"`` to ``sparseland.cli.COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import json

from sparseland.cli import fraction
from sparseland.errors import SparselandError


def _methods() -> tuple[str, ...]:
    from sparseland import registry

    return registry.names("activations")


METHODS = _methods()


def make_config(method: str, sparsity: float, rank: int = 16):
    """The config for a CLI method name (the shared registry's activations family)."""
    from sparseland.registry import make_config as registry_config

    if method not in METHODS:
        raise SparselandError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return registry_config(method, sparsity, **({"rank": rank} if method == "rsparse" else {}))


def _run(args: argparse.Namespace) -> int:
    from sparseland.activations import get_state, save_activation_state, weight_reads_skipped
    from sparseland.activations.sites import counting_zeros, site_fractions
    from sparseland.api import sparsify_
    from sparseland.data import load_corpus
    from sparseland.evaluate import perplexity
    from sparseland.models import load_model

    config = make_config(args.method, args.sparsity, args.rank)
    model, tokenizer = load_model(args.model)
    corpus = load_corpus(tokenizer, args.text)
    windows = corpus.evaluation(args.seq_len, args.max_windows)
    calib = corpus.calibration(args.calib_windows, args.seq_len, seed=0)
    kw = {"seq_len": args.seq_len, "batch_size": args.batch_size, "progress": not args.json}
    dense = perplexity(model, windows, **kw)
    sparsify_(model, config, calibration=calib)
    state = get_state(model)
    with counting_zeros(model) as counts:
        sparse = perplexity(model, windows, **kw)
    measured = site_fractions(counts)
    out = {
        "model": args.model,
        "config": state.config,
        "dense_perplexity": dense.perplexity,
        "perplexity": sparse.perplexity,
        "ratio": sparse.perplexity / dense.perplexity,
        "measured_sparsity": sum(measured.values()) / max(len(measured), 1),
        "weight_reads_skipped": weight_reads_skipped(model, measured),
    }
    if args.save:
        out["saved"] = str(save_activation_state(model, args.save))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"method      {args.method} at {args.sparsity:.0%} ({sparse.n_windows} x {sparse.seq_len} tokens)")
        print(f"perplexity  {sparse.perplexity:.3f} vs dense {dense.perplexity:.3f} ({out['ratio']:.3f}x)")
        print(
            f"measured    {out['measured_sparsity']:.3f} sparsity; "
            f"{out['weight_reads_skipped']:.3f} of the projection weights skipped"
        )
        if args.save:
            print(f"saved       {out['saved']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from sparseland.cli import add_data_args, add_model_args, positive_int

    p = sub.add_parser("activations", help="activation sparsity (TEAL, CATS, CHESS, WINA, R-Sparse): ppl vs dense")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--method", choices=METHODS, default="teal", help="method (default: %(default)s)")
    p.add_argument("--sparsity", type=fraction, default=0.4, help="target sparsity in [0, 1) (default: %(default)s)")
    p.add_argument("--rank", type=positive_int, default=16, help="R-Sparse low-rank size (default: %(default)s)")
    p.add_argument("--calib-windows", type=positive_int, default=16, help="calibration windows (default: %(default)s)")
    p.add_argument("--save", default=None, help="write the thresholds to this .safetensors file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_run)
