"""The frontier: a grid of (method x sparsity x pattern) cells, each measured side by side with dense.

A ``Cell`` says what to do declaratively; a ``Runner`` registered under the cell's method name does
it (``register_runner``), so new families (activation, attention sparsity) plug in without touching
the sweep. Each cell is measured on a fresh copy of the dense model: perplexity on a fixed number of
evaluation windows, the seconds the method took, model bytes (nonzero-aware, ``model_bytes``) and,
optionally, decode (and prefill) tokens/s from a pluggable ``measure_speed(model) -> dict``. The dense model's speed
is measured again right before each cell's, so each speedup is a side-by-side ratio even when the
machine's load changes during a long sweep.

Cells are keyed by a hash of the cell, the model, the data settings, the speed measurement and the
code versions (``FRONTIER_VERSION`` for the protocol, ``Runner.version`` per method), and stored one
by one as they finish (``store.ResultStore``); a rerun skips every cell whose key is stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.bench.cells import (  # noqa: F401  (re-exported)
    LONGCTX_TASKS,
    Calibration,
    Cell,
    FrontierSettings,
    Workload,
    parse_pattern,
)
from sparseland.bench.measure import (  # noqa: F401  (re-exported: the measurements used to live here)
    GreedyDecodeSpeed,
    RuntimeDecodeSpeed,
    SpeedFn,
    default_speed_fn,
    estimate_model_bytes,
    measured_sparsity,
    model_bytes,
    speed_id,
)
from sparseland.bench.runners import (  # noqa: F401  (re-exported)
    FAMILY_ORDER,
    RUNNERS,
    Runner,
    _jsonable,
    get_runner,
    register_runner,
)
from sparseland.bench.store import open_store
from sparseland.errors import SparselandError

FRONTIER_VERSION = "2"  # bump when the measurement protocol changes: invalidates every cell
BASELINES = ("dense", "random", "magnitude")  # always in the grid


# -- the grid ------------------------------------------------------------------------------------
def wants_longctx(cell: Cell, settings: FrontierSettings) -> bool:
    """Long-context accuracy is measured for dense and for cells with sparse attention, when asked for."""
    families = get_runner(cell.method).families
    return bool(settings.longctx_length) and ("dense" in families or "attention" in families)


def cell_key(cell: Cell, settings: FrontierSettings, speed: str | None = None) -> str:
    """Hash of everything that decides a cell's numbers: cell, model, data, speed and code versions."""
    material = {
        "cell": cell.to_dict(),
        "settings": settings.key_dict(longctx=wants_longctx(cell, settings)),
        "speed": speed,
        "frontier_version": FRONTIER_VERSION,
        "runner_version": get_runner(cell.method).version,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def build_grid(methods: Sequence[str], sparsities: Sequence[float], patterns: Sequence[str]) -> list[Cell]:
    """Cells for ``methods x sparsities x patterns`` with dense, random and magnitude always included.

    An N:M pattern fixes the sparsity at ``1 - N/M``: one cell per method whatever the requested
    sparsities. Duplicates are dropped; dense comes first.
    """
    for m in methods:
        get_runner(m)
    if not patterns:
        raise SparselandError("no patterns given; pass e.g. --patterns unstructured,2:4")
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise SparselandError(f"sparsity {s!r} is outside (0, 1); pass fractions such as 0.5,0.7")
    nms = [parse_pattern(p) for p in patterns]
    if not sparsities and None in nms:
        raise SparselandError("the unstructured pattern needs sparsities; pass e.g. --sparsities 0.5")
    cells, seen = [Cell("dense", 0.0, "dense")], set()
    for m in methods:  # quantization alone: one cell
        if get_runner(m).sparsity_free:
            cells.append(Cell(m, 0.0, "dense"))
    for pattern, nm in zip(patterns, nms, strict=False):
        for s in [1 - nm[0] / nm[1]] if nm else sparsities:
            for m in dict.fromkeys([*BASELINES[1:], *methods]):
                if (nm and not get_runner(m).nm_patterns) or get_runner(m).sparsity_free:
                    continue
                if m != "dense" and (m, round(s, 6), pattern) not in seen:
                    seen.add((m, round(s, 6), pattern))
                    cells.append(Cell(m, float(s), pattern))
    return cells


def load_workload(settings: FrontierSettings) -> Workload:
    """Load the model and text named in ``settings`` (the embedded defaults unless overridden)."""
    from sparseland.data import load_corpus
    from sparseland.models import load_model

    model, tokenizer = load_model(settings.model)
    corpus = load_corpus(tokenizer, settings.text)
    windows = corpus.evaluation(settings.seq_len, settings.eval_windows)
    cache: list[torch.Tensor] = []

    def calibration() -> torch.Tensor:
        if not cache:
            cache.append(corpus.calibration(settings.calib_windows, settings.seq_len, settings.seed))
        return cache[0]

    return Workload(model=model, eval_windows=windows, calibration=calibration, seed=settings.seed, tokenizer=tokenizer)


def _median_run(runs: list[dict]) -> dict | None:
    """The run with the median tokens/s (the upper median for an even count), with every round's value."""
    if not runs:
        return None
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": [r["tokens_per_s"] for r in runs]}


def _longctx_record(model, cell: Cell, workload: Workload, settings: FrontierSettings) -> dict[str, Any]:
    """Long-context accuracy of ``model`` (greedy, the lean loop, which runs sparse attention methods)."""
    from sparseland.evaluate.longctx import evaluate_longctx

    samples = workload.longctx_samples(settings)
    res = evaluate_longctx(model, workload.tokenizer, samples, progress=False, label=cell.label)
    return {
        "length": settings.longctx_length,
        "accuracy": res.accuracy(),
        "tasks": {t: res.accuracy(task=t) for t in settings.longctx_tasks},
        "samples": len(res.samples),
        "seconds": sum(x.seconds for x in res.samples),
    }


def _paired_speed(model, base, cell: Cell, measure_speed: SpeedFn, speed_rounds: int) -> tuple:
    """``(dense median run, cell median run)``: dense timed alternately with the cell, so each speedup
    is a side-by-side ratio."""
    dense_runs, runs = [], []
    for _ in range(max(1, speed_rounds)):
        if cell.method != "dense":
            run = measure_speed(model)
            # dense on the same decode path as the cell (fused C++ step or Python step), if the
            # speed function can choose it
            path = run.get("path") if getattr(measure_speed, "supports_path", False) else None
            dense_runs.append(measure_speed(base, path=path) if path else measure_speed(base))
            runs.append(run)
        else:
            runs.append(measure_speed(model))
    return _median_run(dense_runs), _median_run(runs)


def run_cell(
    base: torch.nn.Module,
    cell: Cell,
    workload: Workload,
    settings: FrontierSettings,
    measure_speed: SpeedFn | None = None,
    speed_rounds: int = 3,
) -> dict[str, Any]:
    """Apply ``cell`` to a copy of ``base`` and measure it; returns the result record (without its key).

    Speed: dense and the cell's model are timed alternately ``speed_rounds`` times and each side keeps
    its median round, so a load change on the shared machine hits both sides alike.
    """
    from sparseland.activations.sites import counting_zeros, get_state
    from sparseland.evaluate.agreement import compare

    model = copy.deepcopy(base)
    runner = get_runner(cell.method)
    torch.manual_seed(settings.seed)  # random baselines are reproducible
    t0 = time.perf_counter()
    report = runner.apply(model, cell, workload)
    method_s = time.perf_counter() - t0
    sparse_attention = "attention" in runner.families
    batch = 1 if sparse_attention else settings.batch_size  # sparse attention: batch 1
    with counting_zeros(model) as counts:  # activation sparsity: the zeros the hooks make on the eval data
        # perplexity, and KL / top-1 agreement with the dense model on the same windows (dense logits
        # recomputed per batch, never kept whole)
        ppl = compare(
            {"cell": model}, base, workload.eval_windows, seq_len=settings.seq_len, batch_size=batch, progress=False
        )["cell"]
    weight_sparsity = measured_sparsity(model)
    activation_sparsity = attn_sparsity = None
    if get_state(model) is not None:
        activation_sparsity = sum(z for z, _ in counts.values()) / max(1, sum(n for _, n in counts.values()))
    if sparse_attention:
        from sparseland.attention import measured_sparsity as attention_sparsity

        attn_sparsity = attention_sparsity(model, "prefill")
    # the headline sparsity of the cell: its own family's (a combination's: the weights', if any)
    primary = {"activations": activation_sparsity, "attention": attn_sparsity}.get(runner.families[0])
    sparsity = weight_sparsity if primary is None else primary
    longctx = _longctx_record(model, cell, workload, settings) if wants_longctx(cell, settings) else None
    nbytes, source = model_bytes(model)
    speed = dense_speed = None
    if measure_speed is not None:
        dense_speed, speed = _paired_speed(model, base, cell, measure_speed, speed_rounds)
    return {
        "cell": cell.to_dict(),
        "label": cell.label,
        "family": runner.family,
        "perplexity": ppl.perplexity,
        "nll": math.log(ppl.perplexity),
        "kl_mean": ppl.kl_mean,  # KL(dense || cell) per next token, nats
        "kl_p99": ppl.kl_p99,
        "top1_agreement": ppl.top1_agreement,  # share of next tokens with the dense model's argmax
        "eval_windows": ppl.n_windows,
        "eval_tokens": ppl.n_tokens,
        "eval_seconds": ppl.seconds,
        "method_seconds": method_s,
        "model_bytes": nbytes,
        "bytes_source": source,
        "measured_sparsity": sparsity,  # zero weights, zeroed activations or skipped attention
        "weight_sparsity": weight_sparsity,
        "activation_sparsity": activation_sparsity,
        "attention_sparsity": attn_sparsity,
        "longctx": longctx,
        "speed": speed,
        "dense_speed": dense_speed or speed,
        "method_report": _jsonable(report),
    }


def run_frontier(
    cells: Sequence[Cell],
    settings: FrontierSettings,
    out_dir: str | Path,
    *,
    measure_speed: SpeedFn | None = None,
    workload_fn: Callable[[FrontierSettings], Workload] | None = None,
    progress: bool = True,
    executor: str = "local",
    address: str | None = None,
    cpus_per_cell: float = 1,
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out_dir``'s store, storing each as it finishes; return the grid's results.

    The model is loaded only if some cell is missing. An interruption (Ctrl-C, kill -9) loses at most
    the cell in progress; the next call resumes from the store. ``executor="ray"`` runs the cells as
    Ray tasks (``sparseland.distributed.executor``; ``address``: None starts a local Ray instance,
    "auto" or HOST:PORT joins a cluster); this process stays the only writer of the store.
    """
    if executor not in ("local", "ray"):
        raise SparselandError(f"executor={executor!r} is not 'local' or 'ray'")
    sid = speed_id(measure_speed)
    keys = [cell_key(c, settings, sid) for c in cells]
    with open_store(out_dir) as store:
        store.set_meta("grid", keys)
        store.set_meta("settings", {**settings.key_dict(), "speed": sid})
        done = store.keys()
        todo = [(k, c) for k, c in zip(keys, cells, strict=False) if k not in done]
        if todo:
            bar = tqdm(total=len(todo), desc=f"frontier ({executor})", unit="cell", disable=not progress)
            for key, cell, result in _executed(todo, settings, measure_speed, workload_fn, executor, address,
                                               cpus_per_cell, bar):  # fmt: skip
                bar.update(1)
                bar.set_postfix_str(cell.label)
                result.update(
                    key=key,
                    settings=settings.key_dict(),
                    speed_id=sid,
                    finished_at=time.time(),
                    versions={"frontier": FRONTIER_VERSION, "runner": get_runner(cell.method).version},
                )
                store.put(result)
            bar.close()
        return store.results(keys)


def _executed(todo, settings, measure_speed, workload_fn, executor, address, cpus_per_cell, bar):
    """``(key, cell, result)`` of each cell of ``todo`` as it finishes: here, one after another, or as
    Ray tasks (the caller stores each result: it is the store's only writer either way)."""
    if executor == "ray":
        from sparseland.distributed.executor import run_cells_ray

        yield from run_cells_ray(
            todo, settings, measure_speed, workload_fn, address=address, cpus_per_cell=cpus_per_cell
        )
        return
    workload = (workload_fn or load_workload)(settings)
    base = workload.model.eval()
    for key, cell in todo:
        bar.set_postfix_str(cell.label)
        yield key, cell, run_cell(base, cell, workload, settings, measure_speed)
