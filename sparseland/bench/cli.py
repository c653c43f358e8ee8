"""CLI commands of the frontier: ``sparseland frontier``, ``sparseland report DIR`` and ``sparseland demo``.

``demo`` is the main job on the embedded defaults: dense, random, magnitude, Wanda and SparseGPT at
50% unstructured and 2:4, TEAL activation sparsity and StreamingLLM attention at 50%, Wanda + TEAL
combined at 50%, 4-bit weights (int4-g32) and SparseGPT 50% with its kept weights quantized to 4 bits,
with long-context needle accuracy on dense and the attention cell, about 12 minutes on
2 cores (``--quick``: dense, random, magnitude and Wanda, about 2 minutes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparseland.bench.frontier import RUNNERS
from sparseland.bench.report import render_from_store, summary, text_table, write_report
from sparseland.bench.store import open_store
from sparseland.cli import add_model_args, positive_int
from sparseland.errors import SparselandError

DEFAULT_METHODS = "magnitude,random,wanda,sparsegpt,teal,streaming,wanda+teal,int4,sparsegpt+int4"
QUICK_METHODS = "magnitude,random,wanda"
# (eval windows, calibration windows, speed tokens, long-context length): full and --quick
FULL_SIZES, QUICK_SIZES = (16, 16, 32, 1024), (4, 8, 16, 0)


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise SparselandError(f"--{what} {text!r} is empty; pass a comma-separated list")
    return items


def parse_sparsities(text: str) -> list[float]:
    """``"0.5,0.7"`` (or percentages ``"50%,70%"``) -> ``[0.5, 0.7]``, each in (0, 1)."""
    out = []
    for item in _split(text, "sparsities"):
        try:
            value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
        except ValueError:
            raise SparselandError(f"--sparsities: {item!r} is not a number; pass fractions like 0.5,0.7") from None
        if not 0 < value < 1:
            raise SparselandError(f"--sparsities: {item} is outside (0, 1); pass fractions like 0.5,0.7")
        out.append(value)
    return out


def _add_run_args(p: argparse.ArgumentParser, out_default: str) -> None:
    add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file to use instead of the embedded text")
    p.add_argument("--out", default=out_default, help="directory for results and report (default: %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look: methods {QUICK_METHODS}, {QUICK_SIZES[0]} eval and {QUICK_SIZES[1]} calibration windows",
    )
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        default=None,
        help=f"evaluation windows per cell (default: {FULL_SIZES[0]}, --quick {QUICK_SIZES[0]})",
    )
    p.add_argument(
        "--calib-windows",
        type=positive_int,
        default=None,
        help=f"calibration windows (default: {FULL_SIZES[1]}, --quick {QUICK_SIZES[1]})",
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and random pruning")
    p.add_argument(
        "--speed-tokens",
        type=positive_int,
        default=None,
        help=f"tokens decoded per speed measurement (default: {FULL_SIZES[2]}, --quick {QUICK_SIZES[2]})",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    p.add_argument(
        "--longctx-length",
        type=int,
        default=None,
        help="prompt tokens of the long-context needle tasks measured on dense and sparse-attention cells; "
        f"0 turns them off (default: {FULL_SIZES[3]}, --quick 0)",
    )
    p.add_argument(
        "--longctx-samples",
        type=positive_int,
        default=1,
        help="long-context samples per task (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace, methods: str, sparsities: str, patterns: str, combos_nm: bool = True) -> int:
    from sparseland.bench import frontier as fr  # imports torch

    cells = fr.build_grid(_split(methods, "methods"), parse_sparsities(sparsities), _split(patterns, "patterns"))
    if not combos_nm:  # the demo keeps its combinations to one unstructured cell each (time)
        cells = [c for c in cells if "+" not in c.method or c.pattern == "unstructured"]
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    settings = fr.FrontierSettings(
        model=args.model,
        text=args.text,
        seq_len=args.seq_len,
        eval_windows=args.eval_windows or sizes[0],
        calib_windows=args.calib_windows or sizes[1],
        seed=args.seed,
        batch_size=args.batch_size,
        longctx_length=sizes[3] if args.longctx_length is None else args.longctx_length,
        longctx_samples=args.longctx_samples,
    )
    if settings.longctx_length < 0:
        raise SparselandError(f"--longctx-length {settings.longctx_length} is negative; pass 0 (off) or e.g. 1024")
    speed = None if args.no_speed else fr.default_speed_fn(args.speed_tokens or sizes[2])
    out = Path(args.out).expanduser()
    with open_store(out) as store:  # a bad --out or a foreign store fails here, before the model loads
        done = store.keys() & {fr.cell_key(c, settings, fr.speed_id(speed)) for c in cells}
    print(f"sparseland frontier: {len(cells)} cells ({len(done)} already stored) -> {out}/")
    executor = getattr(args, "executor", "local")
    if executor == "ray":
        from sparseland.distributed import require_ray

        require_ray()  # before any work: without Ray, say how to install it
    results = fr.run_frontier(
        cells,
        settings,
        out,
        measure_speed=speed,
        progress=not args.no_progress,
        executor=executor,
        address=getattr(args, "address", None),
        cpus_per_cell=getattr(args, "cpus_per_cell", 1),
    )
    paths = write_report(results, out, {**settings.key_dict(), "speed": fr.speed_id(speed)}, len(cells))
    print()
    print(text_table(results))
    print()
    for line in summary(results, len(cells)):
        print(line)
    print(f"\nreport: {paths['md']}  {paths['html']}")
    return 0


def _frontier_command(args: argparse.Namespace) -> int:
    methods = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    return _run(args, methods, args.sparsities, args.patterns)


def _demo_command(args: argparse.Namespace) -> int:
    return _run(args, QUICK_METHODS if args.quick else DEFAULT_METHODS, "0.5", "unstructured,2:4", combos_nm=False)


def _report_command(args: argparse.Namespace) -> int:
    results, paths, lines = render_from_store(args.dir)
    print(text_table(results))
    print()
    for line in lines:
        print(line)
    print(f"\nreport: {paths['md']}  {paths['html']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``frontier``, ``report`` and ``demo`` to the ``sparseland`` command."""
    p = sub.add_parser("frontier", help="sweep methods x sparsities x patterns; store results; write a report")
    _add_run_args(p, "sparseland-frontier")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, of: {', '.join(RUNNERS)}, or combinations of different families joined by '+' "
        "(weights+quant+activations+attention, e.g. wanda+teal, or sparsegpt+int4: SparseGPT quantizing the "
        "kept weights jointly); quantization alone (int4, int4-g64, int4-sym, int8, gptq4-g64) is one cell; "
        "dense, random and magnitude are always added "
        f"(default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--sparsities",
        default="0.5",
        help="comma-separated fractions for unstructured cells (N:M patterns fix their own) (default: %(default)s)",
    )
    p.add_argument(
        "--patterns",
        default="unstructured,2:4",
        help="comma-separated: unstructured and/or N:M such as 2:4 (default: %(default)s)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="run the cells here one after another, or as Ray tasks (pip install -e '.[ray]'); this process "
        "stays the only writer of the results store (default: %(default)s)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --executor ray: 'auto' (a cluster started here with `ray start --head`) or HOST:PORT of a "
        "cluster's head; default: start a local Ray instance for this run",
    )
    p.add_argument(
        "--cpus-per-cell",
        type=float,
        default=1,
        help="with --executor ray: CPUs each cell's task declares (default: %(default)s)",
    )
    p.set_defaults(func=_frontier_command)

    p = sub.add_parser("report", help="re-render the report of a frontier directory from its stored results")
    p.add_argument("dir", help="the --out directory of an earlier `sparseland frontier` or `demo`")
    p.set_defaults(func=_report_command)

    p = sub.add_parser(
        "demo",
        help="the main job: dense, random, magnitude, Wanda, SparseGPT at 50%% and 2:4, TEAL, StreamingLLM and "
        "Wanda+TEAL at 50%%, with a report (about 12 minutes on 2 cores; --quick about 2.5)",
    )
    _add_run_args(p, "sparseland-report")
    p.set_defaults(func=_demo_command)
