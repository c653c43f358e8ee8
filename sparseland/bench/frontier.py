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
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

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
from sparseland.bench.store import open_store
from sparseland.errors import SparselandError

FRONTIER_VERSION = "2"  # bump when the measurement protocol changes: invalidates every cell
BASELINES = ("dense", "random", "magnitude")  # always in the grid
LONGCTX_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")  # the tasks dense solves at 1k-2k
Calibration = Callable[[], torch.Tensor]  # () -> (n, T) LongTensor, computed on first use


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"N:M"`` -> ``(N, M)``; ``"unstructured"`` -> ``None``; anything else is a clear error."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise SparselandError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' with 0 < N < M (e.g. 2:4)")


@dataclass
class Cell:
    """One grid point. ``pattern``: "dense", "unstructured" or "N:M"; ``options`` go to the method config."""

    method: str
    sparsity: float
    pattern: str = "unstructured"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": round(float(self.sparsity), 6),
            "pattern": self.pattern,
            "options": dict(sorted(self.options.items())),
        }

    @property
    def label(self) -> str:
        if self.pattern == "dense":
            return self.method
        opts = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method} {self.sparsity:.0%} {self.pattern}{opts}"


@dataclass(frozen=True)
class FrontierSettings:
    """What every cell shares: the model, the text and how much of it is used.

    ``longctx_length`` > 0 adds long-context accuracy (the RULER-style suite of ``sparseland longctx``,
    ``longctx_samples`` per task) to the cells where it is relevant: dense and every cell with sparse
    attention. It is part of the key of those cells only.
    """

    model: str = "smollm2-135m"
    text: str | None = None  # None: the embedded text
    seq_len: int = 512
    eval_windows: int = 16
    calib_windows: int = 16
    seed: int = 0
    batch_size: int = 4  # not part of the cell key: it does not change the numbers
    longctx_length: int = 0  # 0: no long-context accuracy
    longctx_samples: int = 1
    longctx_tasks: tuple[str, ...] = LONGCTX_TASKS

    def key_dict(self, longctx: bool = True) -> dict[str, Any]:
        """The settings that decide a cell's numbers (the long-context ones only if ``longctx`` and on)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        if not (longctx and self.longctx_length):
            for k in ("longctx_length", "longctx_samples", "longctx_tasks"):
                d.pop(k)
        else:
            d["longctx_tasks"] = list(self.longctx_tasks)
        return d


@dataclass
class Workload:
    """The loaded dense model plus its data: evaluation windows, a lazy calibration set and (for
    long-context accuracy) the tokenizer."""

    model: torch.nn.Module
    eval_windows: torch.Tensor  # (N, T)
    calibration: Calibration
    seed: int = 0  # for seeded methods (random pruning)
    tokenizer: Any = None
    _longctx: list = field(default_factory=list, repr=False)

    def longctx_samples(self, settings: FrontierSettings) -> list:
        """The long-context samples of ``settings`` (generated once, seeded)."""
        if not self._longctx:
            if self.tokenizer is None:
                raise SparselandError("long-context accuracy needs the tokenizer in the workload; pass tokenizer=")
            from sparseland.data.longctx import generate_samples
            from sparseland.models.loader import model_context_length

            self._longctx.extend(
                generate_samples(
                    self.tokenizer,
                    [settings.longctx_length],
                    settings.longctx_tasks,
                    settings.longctx_samples,
                    seed=settings.seed,
                    max_context=model_context_length(self.model),
                )
            )
        return self._longctx


# -- runners -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runner:
    """How to apply one method: ``apply(model, cell, workload)`` edits the model in place and may
    return a JSON-able report. ``version`` is part of the cell key: bump it when the method changes."""

    apply: Callable[[torch.nn.Module, Cell, Workload], Any]
    version: str = "1"
    family: str = "weights"
    nm_patterns: bool = True  # False: the grid gives this method unstructured cells only
    parts: tuple[str, ...] = ()  # the families a combined runner applies, in order
    quant_scheme: str | None = None  # quant runners: the scheme (a weights+quant combination prunes and quantizes)
    sparsity_free: bool = False  # the grid gives this method one cell, whatever the sparsities

    @property
    def families(self) -> tuple[str, ...]:
        return self.parts or (self.family,)


RUNNERS: dict[str, Runner] = {}


def register_runner(method: str, runner: Runner) -> None:
    """Make ``method`` usable in grid cells (replaces an earlier runner of that name)."""
    RUNNERS[method] = runner


def get_runner(method: str) -> Runner:
    """The runner of ``method``; ``"a+b"`` combines registered runners of different families (e.g.
    ``wanda+teal``: Wanda weights, then TEAL activations calibrated on the pruned model)."""
    if method not in RUNNERS and "+" in method:
        return _combined_runner(method)
    if method not in RUNNERS:
        raise SparselandError(
            f"unknown frontier method {method!r}; known: {', '.join(sorted(RUNNERS))}, "
            "or a combination of different families joined by '+' (e.g. wanda+teal)"
        )
    return RUNNERS[method]


FAMILY_ORDER = ("weights", "quant", "activations", "attention")  # a combination applies its parts in this order


def _combined_runner(method: str) -> Runner:
    """One runner applying each part of ``"a+b[+c]"`` to the same model with the cell's sparsity: weights
    first (so activation thresholds are calibrated on the pruned model), then activations, then attention."""
    names = [n.strip() for n in method.split("+")]
    if any(not n for n in names):
        raise SparselandError(f"method {method!r} has an empty part; write combinations like wanda+teal")
    runners = {n: get_runner(n) for n in names}
    families = [runners[n].family for n in names]
    if any(f not in FAMILY_ORDER for f in families) or len(set(families)) != len(families):
        raise SparselandError(
            f"method {method!r} combines {', '.join(f'{n} ({f})' for n, f in zip(names, families, strict=True))}; "
            "a combination takes at most one method per family (weights, activations, attention), e.g. wanda+teal"
        )
    order = sorted(names, key=lambda n: FAMILY_ORDER.index(runners[n].family))
    version = "+".join(f"{n}:{runners[n].version}" for n in order)
    quant = next((runners[n] for n in order if runners[n].family == "quant"), None)
    joint = quant is not None and "weights" in families  # prune + quantize in one pass (SparseGPT: jointly)
    if joint:
        order = [n for n in order if runners[n].family != "quant"]

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        reports = {}
        for n in order:
            part = cell if runners[n].family == "weights" else dataclasses.replace(cell, pattern="unstructured")
            if joint and runners[n].family == "weights":
                part = dataclasses.replace(part, options={**part.options, "quant": quant.quant_scheme})
            reports[n] = _jsonable(runners[n].apply(model, dataclasses.replace(part, method=n), workload))
        return reports

    weights = [runners[n] for n in order if runners[n].family == "weights"]
    return Runner(
        apply=apply,
        version=version,
        family="combined",
        nm_patterns=bool(weights) and weights[0].nm_patterns,
        parts=tuple(runners[n].family for n in order),
    )


def _weights_runner(method: str) -> Runner:
    """A runner for a weight-pruning method of the registry (``sparseland.registry``); the cell's
    pattern and options (and the workload's seed) go into its config."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        config = make_config(method, cell.sparsity, pattern=cell.pattern, **{"seed": workload.seed, **cell.options})
        needs = getattr(config, "uses_calibration", getattr(config, "needs_calibration", True))
        return sparsify_(model, config, calibration=workload.calibration() if needs else None)

    return Runner(apply=apply, version="1", family="weights")


def _activation_runner(method: str) -> Runner:
    """A runner for an activation-sparsity method of the registry; its cells are unstructured only, and
    the sparsity is the fraction of zeroed activations the method targets."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        config = make_config(method, cell.sparsity, **cell.options)
        return sparsify_(model, config, calibration=workload.calibration())

    return Runner(apply=apply, version="1", family="activations", nm_patterns=False)


def _quant_runner(method: str) -> Runner:
    """A runner for weight quantization of the registry (``int4``, ``gptq4-g64``, ...): one cell (no
    sparsity of its own); in a combination with a weights method (``sparsegpt+int4``) the pruning
    config quantizes the kept weights (SparseGPT: jointly in its OBS loop)."""
    from sparseland.registry import make_config

    scheme = make_config(method).scheme

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_

        config = make_config(method, **cell.options)
        return sparsify_(model, config, calibration=workload.calibration() if config.needs_calibration else None)

    return Runner(apply=apply, version="1", family="quant", nm_patterns=False, quant_scheme=scheme, sparsity_free=True)


def _attention_runner(method: str) -> Runner:
    """A runner for a sparse-attention method of the registry; the sparsity is the fraction of attention
    it is asked to skip (perplexity windows are short: long-context accuracy is ``sparseland longctx``'s
    job)."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        return sparsify_(model, make_config(method, cell.sparsity, **cell.options))

    return Runner(apply=apply, version="1", family="attention", nm_patterns=False)


def _register_from_registry() -> None:
    """Every registry name of the weights, activations and quant families is a frontier method, and the
    prefill attention methods (decode-only methods do not change perplexity over whole windows)."""
    from sparseland import registry

    makers = {"weights": _weights_runner, "activations": _activation_runner, "quant": _quant_runner}
    for family, make in makers.items():
        for name in registry.names(family):
            register_runner(name, make(name))
    for name in ("streaming", "flexprefill", "vertical_slash", "block_sparse", "xattention"):
        register_runner(name, _attention_runner(name))


register_runner("dense", Runner(apply=lambda model, cell, workload: None, family="dense"))
_register_from_registry()


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


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of a method's report (``to_dict`` objects and dataclasses are converted)."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


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
    if measure_speed is not None:  # dense timed alternately with the cell: side-by-side ratios
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
        dense_speed, speed = _median_run(dense_runs), _median_run(runs)
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
