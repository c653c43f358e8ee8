"""The out-of-core driver: ``prune_offload`` prunes a model directory block by block (the design is in
this package's docstring), with the statistics computed in this process or by remote workers."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.api import FilterFn
from sparseland.errors import SparselandError
from sparseland.io import atomic_directory
from sparseland.weights.config import PruningConfig
from sparseland.weights.offload.blocks import BlockWorker, build_shell, load_config, materialize, release, sum_stats
from sparseland.weights.offload.shards import ShardReader, assemble_safetensors, save_shard
from sparseland.weights.offload.state import (
    OffloadReport,
    commit_state,
    fingerprint,
    open_state,
    peak_rss_mb,
    trim_heap,
    work_dir_for,
)
from sparseland.weights.pruner import _check_calibration, block_linears, prune_weight, quantize_pruned_

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*")
_TWIN = {"model.embed_tokens.weight": "lm_head.weight", "lm_head.weight": "model.embed_tokens.weight"}


@dataclass
class _Run:
    """What every step of one run shares: the source shards and the meta skeleton, the work directory
    and its state, and the statistics workers (``call`` runs a method on all of them)."""

    config: PruningConfig
    model_dir: Path
    hf_config: Any
    reader: ShardReader
    shell: torch.nn.Module
    filter_fn: FilterFn | None
    source: dict[str, str]  # head tensor name -> the name it is stored under
    tied: bool
    work: Path
    state: dict[str, Any]
    workers: list
    call: Callable
    local: bool
    shares: list[torch.Tensor] | None  # each worker's calibration windows; None without calibration
    calibration: torch.Tensor | None  # the checked windows; None for a method without calibration
    calib_batch: int

    @property
    def layers(self):
        return self.shell.model.layers

    def commit(self) -> None:
        commit_state(self.work, self.state)


def _check_arguments(config: PruningConfig, out_dir: Path, calib_batch) -> None:
    if out_dir.exists():
        raise SparselandError(f"{out_dir} already exists; choose a new output directory or delete it first")
    if config.allocation == "owl":
        raise SparselandError(
            "allocation='owl' needs a dense pass over every block before pruning and is not supported with "
            "--offload; use allocation='uniform', or prune in memory"
        )
    if not (isinstance(calib_batch, int) and calib_batch > 0):
        raise SparselandError(f"calib_batch={calib_batch!r} must be a positive integer (windows per micro-batch)")


def _check_nm(layers, config: PruningConfig, filter_fn: FilterFn | None) -> None:
    if config.nm is None:
        return
    from sparseland.weights.masks import check_nm_shape

    for i, block in enumerate(layers):
        for name, mod in block_linears(block, f"model.layers.{i}", filter_fn).items():
            check_nm_shape(mod.in_features, config.nm[1], name)


def _head_sources(expected: set[str], reader: ShardReader, tied: bool, model_dir: Path) -> dict[str, str]:
    """Where each head tensor is stored: a tied lm_head/embedding pair may be saved under either name."""
    source = {}
    for name in expected:
        if name.startswith("model.layers."):
            continue
        if name in reader.where:
            source[name] = name
        elif tied and _TWIN.get(name) in reader.where:
            source[name] = _TWIN[name]
        else:
            raise SparselandError(f"{model_dir}: the shards have no tensor {name!r} that the config needs")
    return source


def _make_workers(workers, work: Path, gram: bool, shell, calibration):
    """``(workers, call, local, shares)``: this process (sharing the shell) or remote workers that build
    their own, and each one's share of the calibration windows."""
    local = not workers
    if local:
        workers = [BlockWorker(None, str(work / "acts" / "w0"), gram, shell=shell)]
    call = _local_call(workers) if local else _remote_call(workers)
    shares = None
    if calibration is not None:
        shares = [s for s in calibration.tensor_split(len(workers)) if s.shape[0]]
        if len(shares) != len(workers):
            raise SparselandError(f"{len(workers)} workers need at least {len(workers)} calibration windows")
    return workers, call, local, shares


def _encode(name: str, t: torch.Tensor, compress: bool, qw=None) -> tuple[dict, dict]:
    from sparseland.runtime.checkpoint import encode_quant, encode_tensor

    if qw is not None:
        return encode_quant(name, qw)
    return encode_tensor(name, t, compress=compress)


def _start_run(run: _Run) -> None:
    """Write the head tensors (embeddings, final norm, untied lm_head; dense in their stored dtype) and
    the first block's inputs, and record block 0 as ready."""
    state = run.state
    head = {}
    for name in sorted(run.source):
        if name == "lm_head.weight" and run.tied:
            state["aliases"][name] = "model.embed_tokens.weight"
            continue
        rec, stored = _encode(name, run.reader.get(run.source[name]), compress=False)
        state["records"][name] = rec
        head.update(stored)
    save_shard(run.work / "shards" / "head.safetensors", head)
    del head
    if run.shares is not None:
        embed = run.reader.get(run.source["model.embed_tokens.weight"]).float()
        state["n_batches"] = run.call("capture", per=[(s, run.calib_batch, embed) for s in run.shares])
        del embed
    state["done"] = 0
    run.commit()


def _load_block(run: _Run, i: int) -> dict[str, torch.dtype]:
    """Materialize block ``i`` from the shards (in the driver and the workers); returns its stored dtypes."""
    prefix = f"model.layers.{i}."
    src = {k[len(prefix) :]: run.reader.get(k) for k in run.reader.where if k.startswith(prefix)}
    src_dtype = {k: v.dtype for k, v in src.items()}
    materialize(run.layers[i], src)
    if not run.local and run.shares is not None:
        run.call("load_block", i, {k: v.float() for k, v in src.items()})
    elif run.shares is not None:
        run.workers[0].load_block(i, None)
    return src_dtype


def _prune_block(run: _Run, i: int, linears: dict, index: int, sparsity: float) -> None:
    """Prune block ``i``'s Linears in true sequential order: each group sharing an input is pruned on
    the statistics of the inputs the already pruned groups produce."""
    config = run.config
    prefix = f"model.layers.{i}."
    rel = {full[len(prefix) :]: mod for full, mod in linears.items()}
    position = {name: index + k for k, name in enumerate(linears)}

    def prune(name, mod, stats) -> None:
        W = mod.weight.data
        if config.quant is not None:
            quantize_pruned_(mod, config, sparsity, stats, name, position[name])
        else:
            W.copy_(prune_weight(W, config, sparsity, stats, name, position[name]))

    if config.needs_calibration:
        done: list[str] = []
        while len(done) < len(rel):
            found = sum_stats(run.call("stage_stats", i % 2, list(rel), done))
            if found is None:
                missing = next(n for n in rel if n not in done)
                raise SparselandError(
                    f"{prefix}{missing} was not called in its block's forward; leave it out with filter_fn"
                )
            group, st = found
            for n in group:
                prune(prefix + n, rel[n], st)
            done.extend(group)
            if not run.local:
                run.call("set_weights", {n: rel[n].weight.data for n in group})
    else:
        for n, mod in rel.items():
            prune(prefix + n, mod, None)
        if not run.local and run.shares is not None:
            run.call("set_weights", {n: m.weight.data for n, m in rel.items()})


def _save_block(run: _Run, i: int, pruned: set[str], src_dtype: dict[str, torch.dtype]) -> None:
    """Encode block ``i`` into its shard (Linear weights compressed, in the shards' dtype) and count
    the zeros of the pruned Linears (``pruned``: names relative to the block)."""
    from sparseland.quant.apply import quant_state

    state = run.state
    block = run.layers[i]
    prefix = f"model.layers.{i}."
    all_linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for k, t in block.state_dict().items():
        full = prefix + k
        mod_name = k.removesuffix(".weight")
        qw = quant_state(block.get_submodule(mod_name)) if mod_name in all_linears else None
        t = t.to(src_dtype.get(k, t.dtype))
        rec, stored = _encode(full, t, compress=mod_name in all_linears, qw=qw)
        state["records"][full] = rec
        tensors.update(stored)
        if mod_name in pruned:
            z = int((t == 0).sum())
            state["layer_sparsity"][full.removesuffix(".weight")] = z / t.numel()
            state["zeros"] += z
            state["total"] += t.numel()
    save_shard(run.work / "shards" / f"block-{i:05d}.safetensors", tensors)


def _do_block(run: _Run, i: int, index: int, sparsity: float) -> int:
    """Load, prune, advance the activations past, and save block ``i``; returns its Linear count."""
    src_dtype = _load_block(run, i)
    block = run.layers[i]
    linears = block_linears(block, f"model.layers.{i}", run.filter_fn)
    _prune_block(run, i, linears, index, sparsity)
    if run.shares is not None and i + 1 < len(run.layers):
        run.call("advance", i % 2)
    prefix = f"model.layers.{i}."
    _save_block(run, i, {full[len(prefix) :] for full in linears}, src_dtype)
    if not run.local:
        run.call("drop_block", True)
    elif run.shares is not None:
        run.workers[0].drop_block(False)
    release(block)
    return len(linears)


def _block_loop(run: _Run, report: OffloadReport, tokens: int, progress: bool, on_block_done) -> None:
    state, n_blocks = run.state, len(run.layers)
    bar = tqdm(
        total=n_blocks,
        initial=state["done"],
        desc=f"prune {run.config.kind} (offload)",
        unit="block",
        disable=not progress,
    )
    index = sum(len(block_linears(run.layers[i], f"model.layers.{i}", run.filter_fn)) for i in range(state["done"]))
    try:
        for i in range(state["done"], n_blocks):
            t0 = time.perf_counter()
            index += _do_block(run, i, index, report.block_sparsity[i])
            state["done"] = i + 1
            run.commit()
            trim_heap()  # the block's freed memory back to the system, so the peak does not creep up
            dt = time.perf_counter() - t0
            report.block_seconds.append(dt)
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / dt:.0f}" if tokens else "-", peak_rss=f"{peak_rss_mb():.0f}MB")
            if on_block_done is not None:
                on_block_done(i)
    finally:
        bar.close()


def _manifest(run: _Run, report: OffloadReport, metadata: dict | None) -> dict[str, Any]:
    from sparseland.runtime.checkpoint import FORMAT_NAME, FORMAT_VERSION

    cfg = run.hf_config.to_dict()
    cfg.pop("quantization_config", None)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "metadata": json.loads(json.dumps({**(metadata or {}), "report": report.to_dict()}, default=str)),
        "model_class": (getattr(run.hf_config, "architectures", None) or [type(run.shell).__name__])[0],
        "config": cfg,
        "aliases": run.state["aliases"],
        "tensors": {k: run.state["records"][k] for k in sorted(run.state["records"])},
    }


def _assemble(run: _Run, report: OffloadReport, out_dir: Path, tokenizer, metadata: dict | None) -> None:
    """Write the checkpoint into a temporary directory beside ``out_dir`` and rename it into place."""
    from sparseland.runtime.checkpoint import WEIGHTS_FILE

    manifest = _manifest(run, report, metadata)
    shards = [run.work / "shards" / "head.safetensors"] + [
        run.work / "shards" / f"block-{i:05d}.safetensors" for i in range(len(run.layers))
    ]
    with atomic_directory(out_dir) as tmp:
        report.checkpoint_bytes = assemble_safetensors(shards, tmp / WEIGHTS_FILE)
        manifest["metadata"]["report"]["checkpoint_bytes"] = report.checkpoint_bytes
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            for pattern in TOKENIZER_GLOBS:
                for f in run.model_dir.glob(pattern):
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        (tmp / "sparseland.json").write_text(json.dumps(manifest, indent=1, default=str))


def _open_run(model_dir, config, out_dir, calibration, calib_batch, resume, filter_fn, workers) -> _Run:
    """Check the arguments and the shards, and open (or resume) the run's work directory."""
    _check_arguments(config, out_dir, calib_batch)
    hf_config = load_config(model_dir)
    reader = ShardReader(model_dir)
    shell = build_shell(hf_config)
    calibration = _check_calibration(calibration, config) if config.uses_calibration else None
    _check_nm(shell.model.layers, config, filter_fn)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    source = _head_sources(set(shell.state_dict()), reader, tied, model_dir)
    fp = fingerprint(model_dir, config, calibration, calib_batch, len(workers) if workers else 1)
    work = work_dir_for(out_dir)
    state = open_state(work, resume, fp)
    workers, call, local, shares = _make_workers(workers, work, config.needs_hessian, shell, calibration)
    return _Run(
        config, model_dir, hf_config, reader, shell, filter_fn, source, tied, work, state, workers, call, local,
        shares, calibration, calib_batch,
    )  # fmt: skip


@torch.no_grad()
def prune_offload(
    model_dir: str | Path,
    config: PruningConfig,
    out_dir: str | Path,
    calibration: torch.Tensor | None = None,
    *,
    calib_batch: int = 8,
    resume: bool = False,
    filter_fn: FilterFn | None = None,
    workers: list | None = None,
    tokenizer: Any = None,
    metadata: dict | None = None,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
) -> OffloadReport:
    """Prune the model in ``model_dir`` block by block and write the sparse checkpoint ``out_dir``.

    ``calib_batch``: calibration windows per micro-batch. ``resume``: continue the run whose work
    directory ``<out_dir>.partial`` a killed run left. ``workers``: remote statistics workers (see
    ``sparseland.distributed.calibration``); None computes everything in this process.
    ``on_block_done(i)`` is called after block ``i`` is recorded as done (tests use it to crash)."""
    start = time.perf_counter()
    model_dir = Path(model_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    run = _open_run(model_dir, config, out_dir, calibration, calib_batch, resume, filter_fn, workers)
    resumed_from = max(run.state["done"], 0)
    if run.state["done"] < 0:
        try:
            _start_run(run)
        except BaseException:
            shutil.rmtree(run.work, ignore_errors=True)  # nothing a resume could use was recorded
            raise
    elif run.shares is not None:
        run.call("attach_batches", per=[(nb,) for nb in run.state["n_batches"]])
    n_blocks = len(run.layers)
    report = OffloadReport(
        method=config.kind,
        pattern=config.pattern,
        target_sparsity=float(config.sparsity),
        allocation=config.allocation,
        block_sparsity=[float(config.sparsity)] * n_blocks,
        calibration_windows=0 if run.calibration is None else int(run.calibration.shape[0]),
        resumed_from=resumed_from,
        workers=len(run.workers),
    )
    tokens = 0 if run.calibration is None else int(run.calibration.numel())
    _block_loop(run, report, tokens, progress, on_block_done)
    report.layer_sparsity = run.state["layer_sparsity"]
    report.overall_sparsity = run.state["zeros"] / run.state["total"] if run.state["total"] else 0.0
    report.peak_rss_mb = peak_rss_mb()
    report.seconds = time.perf_counter() - start
    _assemble(run, report, out_dir, tokenizer, metadata)
    shutil.rmtree(run.work, ignore_errors=True)
    return report


def _local_call(workers):
    def call(method, *args, per=None):
        if per is not None:
            return [getattr(w, method)(*a) for w, a in zip(workers, per, strict=True)]
        return [getattr(w, method)(*args) for w in workers]

    return call


def _remote_call(workers):
    """Call a method on every Ray actor (in parallel) and gather the results; dict and tensor arguments
    go into the object store once. ``per=[args, ...]`` gives each worker its own arguments."""
    import ray

    def call(method, *args, per=None):
        if per is not None:
            put: dict[int, Any] = {}  # a tensor shared by every worker's arguments goes in once

            def ref(a):
                if not isinstance(a, torch.Tensor):
                    return a
                if id(a) not in put:
                    put[id(a)] = ray.put(a)
                return put[id(a)]

            return ray.get([getattr(w, method).remote(*map(ref, a)) for w, a in zip(workers, per, strict=True)])
        refs = [ray.put(a) if isinstance(a, (dict, torch.Tensor)) else a for a in args]
        return ray.get([getattr(w, method).remote(*refs) for w in workers])

    return call


def _embedded_dir(name: str) -> Path:
    """The on-disk float32 safetensors directory of a known embedded model (converted once if needed)."""
    from sparseland.models.loader import KNOWN_MODELS, embedded_model_dir

    if name not in KNOWN_MODELS:
        return Path(name).expanduser()
    return embedded_model_dir(name)


def model_dir_of(name_or_path: str) -> Path:
    """The model directory ``--offload`` reads: a known embedded name's cache, or a local directory."""
    path = _embedded_dir(str(name_or_path))
    if not path.is_dir():
        raise SparselandError(
            f"--offload reads a model directory; {name_or_path!r} is not one (pass a Hugging Face model "
            "directory with config.json and *.safetensors shards, or an embedded name such as smollm2-135m)"
        )
    if (path / "sparseland.json").is_file():
        raise SparselandError(f"{path} is already a sparse checkpoint; --offload prunes a dense model directory")
    return path
