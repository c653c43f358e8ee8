"""Benchmarks: frontier sweeps (method x sparsity x pattern), their result store, plots and reports."""

from sparseland.bench.frontier import (
    BASELINES,
    FRONTIER_VERSION,
    RUNNERS,
    Cell,
    FrontierSettings,
    GreedyDecodeSpeed,
    Runner,
    RuntimeDecodeSpeed,
    Workload,
    build_grid,
    cell_key,
    default_speed_fn,
    estimate_model_bytes,
    measured_sparsity,
    model_bytes,
    register_runner,
    run_frontier,
)
from sparseland.bench.report import render_from_store, summary, write_report
from sparseland.bench.store import ResultStore, open_store

__all__ = [
    "BASELINES",
    "FRONTIER_VERSION",
    "RUNNERS",
    "Cell",
    "FrontierSettings",
    "GreedyDecodeSpeed",
    "ResultStore",
    "Runner",
    "RuntimeDecodeSpeed",
    "Workload",
    "build_grid",
    "cell_key",
    "default_speed_fn",
    "estimate_model_bytes",
    "measured_sparsity",
    "model_bytes",
    "open_store",
    "register_runner",
    "render_from_store",
    "run_frontier",
    "summary",
    "write_report",
]
