"""``sparseland attention-search``: the offline per-head pattern search (MoA style), saved with the model.

    sparseland attention-search --model ./my-model --budget 0.15 --seq-len 2048 --windows 2

Writes ``sparse_attention.json`` into ``--out`` (default: the model directory, when it is one);
apply it later with ``sparsify_(model, load_head_patterns(dir))``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from sparseland.attention import StreamingConfig, VerticalSlashConfig, search_head_patterns
    from sparseland.attention.search import save_head_patterns
    from sparseland.data import load_corpus
    from sparseland.errors import SparselandError
    from sparseland.models import load_model

    if not 0 < args.budget <= 1:
        raise SparselandError(f"--budget {args.budget} must be a density in (0, 1], e.g. 0.15")
    out = args.out or (args.model if Path(args.model).is_dir() else None)
    if out is None:
        raise SparselandError(f"--model {args.model!r} is not a directory; pass --out DIR to save the patterns")
    bs = args.block_size
    candidates = [StreamingConfig(block_size=bs, window=w) for w in (0.02, 0.05, 0.1, 0.2)]
    candidates += [VerticalSlashConfig(block_size=bs, vertical=f, slash=f) for f in (0.02, 0.05, 0.1)]
    model, tokenizer = load_model(args.model)
    calib = load_corpus(tokenizer, args.text).calibration(args.windows, args.seq_len, seed=0)
    cfg = search_head_patterns(model, calib, candidates, args.budget)
    path = save_head_patterns(cfg, out)
    counts = {i: sum(row.count(i) for row in cfg.choice) for i in range(len(candidates))}
    for i, c in enumerate(candidates):
        print(f"{counts[i]:4d} heads  {c.to_json()}")
    print(f"saved {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from sparseland.cli import add_model_args, positive_int

    p = sub.add_parser(
        "attention-search",
        help="choose a sparse attention pattern per head on calibration text (MoA style) and save it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file to use instead of the embedded text")
    p.add_argument("--budget", type=float, default=0.15, help="mean attention density (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=positive_int, default=2, help="calibration windows (default: %(default)s)")
    p.add_argument("--block-size", type=positive_int, default=64, help="pattern block size (default: %(default)s)")
    p.add_argument("--out", default=None, help="directory for sparse_attention.json (default: the model directory)")
    p.set_defaults(func=_run)
