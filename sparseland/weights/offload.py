"""Out-of-core pruning: a model whose weights do not fit in memory, pruned one decoder block at a time.

The model directory (a Hugging Face directory: ``config.json`` + one or more ``*.safetensors`` shards)
is never loaded whole. The driver builds the model on the ``meta`` device (no memory), materializes
only the embedding (to make the first block's inputs) and the rotary tables, and then, for each
decoder block in turn:

1. reads the block's tensors from the shards (positioned reads of just those bytes: a memory map's
   touched pages would count in the process's RSS until it is unmapped) and converts them to float32;
2. prunes it in the "true sequential" order of the in-memory driver (``pruner.prune_model``): one
   pass over the calibration micro-batches collects the statistics of the first group of not yet pruned
   Linears that share an input (q/k/v, then o, then gate/up, then down for a Llama block), stopping the
   block's forward at the next group's input; the group is pruned; the next pass sees the pruned
   weights. Statistics (sums of squares; Gram matrices X^T X for SparseGPT/DSnoT) add up over
   micro-batches, so memory holds one micro-batch of activations, never all of them;
3. runs the pruned block over each micro-batch, writing the outputs (the next block's inputs) into a
   double-buffered activation directory on disk;
4. encodes the block's tensors with the sparse checkpoint's encodings (``runtime/checkpoint.py``) into
   its own shard file, and then, atomically, records the block as done in ``state.json``.

Peak memory is one float32 block + one micro-batch of activations + the embedding, whatever the depth.
Everything lives in a work directory beside the output (``<out>.partial``); a run that was killed
resumes from the last finished block (``resume=True``) and gives the same checkpoint as an
uninterrupted run, because every input of block k+1 (activations and the pruned block k's shard) is on
disk when block k is recorded as done. At the end the shards are streamed (in 64 MiB pieces) into one
``model.safetensors`` of the usual sparse checkpoint format, with ``sparseland.json`` and the tokenizer,
in a temporary directory that is renamed into place.

The statistics can also be computed by several workers (``workers=[...]``, e.g. Ray actors from
``sparseland.distributed``): each holds its share of the calibration windows and returns per-Linear
sums; the driver adds them, prunes, and sends the pruned weights back.

Not supported out of core (a clear error): OWL allocation (it needs a dense pass over every block
first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.api import FilterFn
from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic
from sparseland.weights.config import PruningConfig
from sparseland.weights.pruner import InputStats, _check_calibration, _Stop, block_linears, prune_weight

STATE_FILE = "state.json"
STATE_VERSION = 1
COPY_CHUNK = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------
# safetensors files, read tensor by tensor


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file: header maps names to dtype, shape, data_offsets."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise SparselandError(f"{path} is not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + n


class ShardReader:
    """The tensors of a model directory's safetensors shards, each read on demand with positioned reads."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise SparselandError(
                f"{self.dir} holds no *.safetensors shards; out-of-core pruning reads a Hugging Face model "
                "directory saved with safetensors (model.save_pretrained(DIR, safe_serialization=True))"
            )
        self.where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for file in files:
            header, start = read_safetensors_header(file)
            for name, rec in header.items():
                self.where[name] = (file, rec, start)

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.where[name][1]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        file, rec, start = self.where[name]
        b, e = rec["data_offsets"]
        out = torch.empty(rec["shape"], dtype=_ST_DTYPES[rec["dtype"]])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            with open(file, "rb") as f:
                f.seek(start + b)
                if f.readinto(memoryview(buf)) != e - b:
                    raise SparselandError(f"{file}: tensor {name!r} is truncated; the shard is incomplete")
        return out


# ---------------------------------------------------------------------------------------------------
# The model skeleton on the meta device, and one block at a time on the CPU


def load_config(model_dir: str | Path):
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SparselandError(
            f"{model_dir} has no config.json; --offload needs a Hugging Face model directory "
            "(config.json + *.safetensors shards)"
        )
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def build_shell(config) -> torch.nn.Module:
    """The model on the meta device (no memory), with real rotary tables so block inputs can be made."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inner = shell.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None:
        inner.rotary_emb = type(rot)(config=config)
    return shell.eval()


def materialize(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a meta module real CPU float tensors from ``state`` (names relative to the module)."""
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if k in dict(module.named_parameters())]
    if missing or unexpected:
        raise SparselandError(f"the shards do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def release(module: torch.nn.Module) -> None:
    module.to_empty(device="meta")


# ---------------------------------------------------------------------------------------------------
# Workers: hold calibration windows' activations (on disk) and compute statistics of the current block


def _stats_tuple(st: InputStats) -> tuple:
    return (st.n, st.sum, st.sumsq, st.gram)


def sum_stats(parts: list[tuple[list[str], tuple] | None]) -> tuple[list[str], InputStats] | None:
    """Add the statistics of one group of Linears from several workers: every field is a sum."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    names = parts[0][0]
    if any(p[0] != names for p in parts):
        raise SparselandError(f"workers disagree on the Linears fed by one input: {[p[0] for p in parts]}")
    n, s, sq, gram = parts[0][1]
    st = InputStats(s.shape[0], False)
    st.n, st.sum, st.sumsq = n, s.clone(), sq.clone()
    st.gram = None if gram is None else gram.clone()
    for _, (n, s, sq, gram) in parts[1:]:
        st.n += n
        st.sum += s
        st.sumsq += sq
        if gram is not None:
            st.gram += gram
    return names, st


class BlockWorker:
    """A share of the calibration windows, micro-batched, and the current block (its own, or shared with
    the driver's in-process shell). Activations live in ``buffer_dir/{0,1}/{j}.pt``: block i reads parity
    i % 2 and writes parity (i + 1) % 2."""

    def __init__(self, config_dict: dict[str, Any], buffer_dir: str, gram: bool, shell: torch.nn.Module | None = None):
        if shell is None:
            from transformers import AutoConfig

            cfg = dict(config_dict)
            shell = build_shell(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        self.shell = shell
        self.buffer = Path(buffer_dir)
        self.gram = gram
        self.n_batches = 0
        self.block: torch.nn.Module | None = None

    def _path(self, parity: int, j: int) -> Path:
        return self.buffer / str(parity) / f"{j:06d}.pt"

    def _write(self, parity: int, j: int, hidden: torch.Tensor, kwargs: dict) -> None:
        path = self._path(parity, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"hidden": hidden.contiguous(), "kwargs": kwargs}, tmp)
        os.replace(tmp, path)

    def _read(self, parity: int, j: int) -> tuple[torch.Tensor, dict]:
        d = torch.load(self._path(parity, j), weights_only=True)
        return d["hidden"], d["kwargs"]

    @torch.no_grad()
    def capture(self, calibration: torch.Tensor, micro: int, embed: torch.Tensor | None = None) -> int:
        """First block's inputs of each micro-batch of ``calibration`` into parity 0; returns the count."""
        inner = self.shell.model
        if embed is not None:
            materialize(inner.embed_tokens, {"weight": embed})
        layer0 = inner.layers[0]
        captured: list = []

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Stop

        handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            for j, batch in enumerate(calibration.split(micro)):
                with contextlib.suppress(_Stop):
                    inner(input_ids=batch, use_cache=False)
                hidden, kwargs = captured.pop()
                self._write(0, j, hidden, kwargs)
        finally:
            handle.remove()
            if embed is not None:
                release(inner.embed_tokens)
        self.n_batches = -(-calibration.shape[0] // micro) if calibration.shape[0] else 0
        return self.n_batches

    def attach_batches(self, n_batches: int) -> None:
        """Resume: the activations are already on disk."""
        self.n_batches = n_batches

    def load_block(self, index: int, state: dict[str, torch.Tensor] | None) -> None:
        self.block = self.shell.model.layers[index]
        if state is not None:
            materialize(self.block, state)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            self.block.get_submodule(name).weight.data.copy_(w)

    def drop_block(self, owned: bool) -> None:
        if owned and self.block is not None:
            release(self.block)
        self.block = None

    @torch.no_grad()
    def stage_stats(self, parity: int, linears: list[str], done: list[str]) -> tuple[list[str], tuple] | None:
        """``(names, (n, sum, sumsq, gram))``: the statistics of the first group of not yet pruned Linears
        (names relative to the block) fed by one input tensor, summed over this worker's micro-batches.
        Each forward stops at the first Linear fed by another tensor. None when no such Linear ran."""
        todo = [n for n in linears if n not in set(done)]
        group: list[str] = []
        cur: list = [None, None]  # this micro-batch's group input and its statistics

        def make_hook(name):
            def hook(module, args):
                x = args[0]
                if cur[0] is None:
                    cur[0] = x
                    cur[1] = InputStats(x.shape[-1], self.gram)
                    cur[1].add(x)
                elif x is not cur[0]:
                    raise _Stop
                if name not in group:
                    group.append(name)

            return hook

        acc: InputStats | None = None
        handles = [self.block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in todo]
        try:
            for j in range(self.n_batches):
                hidden, kwargs = self._read(parity, j)
                cur[0] = cur[1] = None
                with contextlib.suppress(_Stop):
                    self.block(hidden, **kwargs)
                st = cur[1]
                cur[0] = cur[1] = None
                if st is None:
                    continue
                if acc is None:
                    acc = st
                else:
                    acc.n += st.n
                    acc.sum += st.sum
                    acc.sumsq += st.sumsq
                    if st.gram is not None:
                        acc.gram += st.gram
        finally:
            for h in handles:
                h.remove()
        if acc is None:
            return None
        return [n for n in todo if n in group], _stats_tuple(acc)

    @torch.no_grad()
    def advance(self, parity: int) -> None:
        """Run the (pruned) block over every micro-batch; outputs become the next block's inputs."""
        for j in range(self.n_batches):
            hidden, kwargs = self._read(parity, j)
            y = self.block(hidden, **kwargs)
            self._write(1 - parity, j, y[0] if isinstance(y, tuple) else y, kwargs)


# ---------------------------------------------------------------------------------------------------
# The driver


@dataclass
class OffloadReport:
    method: str
    pattern: str
    target_sparsity: float
    allocation: str
    block_sparsity: list[float]
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    overall_sparsity: float = 0.0
    seconds: float = 0.0
    calibration_windows: int = 0
    block_seconds: list[float] = field(default_factory=list)  # this run's wall time of each block it did
    resumed_from: int = 0
    peak_rss_mb: float = 0.0
    checkpoint_bytes: int = 0
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / (out_dir.name + ".partial")


def _fingerprint(model_dir: Path, config: PruningConfig, calibration, micro: int, n_workers: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(model_dir.resolve()).encode())
    h.update(f"{micro}/{n_workers}".encode())
    if calibration is not None:
        h.update(calibration.numpy().tobytes())
    for file in sorted(model_dir.glob("*.safetensors")):
        st = file.stat()
        h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _encode(name: str, t: torch.Tensor, compress: bool, qw=None) -> tuple[dict, dict]:
    from sparseland.runtime.checkpoint import encode_quant, encode_tensor

    if qw is not None:
        return encode_quant(name, qw)
    return encode_tensor(name, t, compress=compress)


def assemble_safetensors(shards: list[Path], out: Path) -> int:
    """Stream the tensors of ``shards`` (in order) into one safetensors file ``out``; returns its bytes."""
    entries = []
    offset = 0
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for shard in shards:
        h, start = read_safetensors_header(shard)
        for name, rec in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, e = rec["data_offsets"]
            header[name] = {"dtype": rec["dtype"], "shape": rec["shape"], "data_offsets": [offset, offset + e - b]}
            entries.append((shard, start + b, e - b))
            offset += e - b
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for shard in shards:
            with open(shard, "rb") as src:
                for _, pos, size in (e for e in entries if e[0] == shard):
                    src.seek(pos)
                    while size:
                        chunk = src.read(min(size, COPY_CHUNK))
                        if not chunk:
                            raise SparselandError(f"{shard} is truncated")
                        f.write(chunk)
                        size -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return out.stat().st_size


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
    if out_dir.exists():
        raise SparselandError(f"{out_dir} already exists; choose a new output directory or delete it first")
    if config.allocation == "owl":
        raise SparselandError(
            "allocation='owl' needs a dense pass over every block before pruning and is not supported with "
            "--offload; use allocation='uniform', or prune in memory"
        )
    if not (isinstance(calib_batch, int) and calib_batch > 0):
        raise SparselandError(f"calib_batch={calib_batch!r} must be a positive integer (windows per micro-batch)")
    hf_config = load_config(model_dir)
    reader = ShardReader(model_dir)
    shell = build_shell(hf_config)
    layers = shell.model.layers
    n_blocks = len(layers)
    calibration = _check_calibration(calibration, config) if config.uses_calibration else None
    nm = config.nm
    if nm is not None:
        from sparseland.weights.masks import check_nm_shape

        for i, block in enumerate(layers):
            for name, mod in block_linears(block, f"model.layers.{i}", filter_fn).items():
                check_nm_shape(mod.in_features, nm[1], name)
    expected = set(shell.state_dict())
    # Where each head tensor is stored: a tied lm_head/embedding pair may be saved under either name.
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    twin = {"model.embed_tokens.weight": "lm_head.weight", "lm_head.weight": "model.embed_tokens.weight"}
    source = {}
    for name in expected:
        if name.startswith("model.layers."):
            continue
        if name in reader.where:
            source[name] = name
        elif tied and twin.get(name) in reader.where:
            source[name] = twin[name]
        else:
            raise SparselandError(f"{model_dir}: the shards have no tensor {name!r} that the config needs")
    n_workers = len(workers) if workers else 1
    fp = _fingerprint(model_dir, config, calibration, calib_batch, n_workers)

    work = work_dir_for(out_dir)
    state_path = work / STATE_FILE
    if work.exists() and not resume:
        raise SparselandError(
            f"{work} exists: a previous run of this output was interrupted; pass --resume (resume=True) to "
            "continue it, or delete that directory to start over"
        )
    state: dict[str, Any]
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != fp:
            raise SparselandError(
                f"{work} was left by a run with other settings (model, method, calibration, --calib-batch or "
                "workers differ); rerun with the same settings, or delete it to start over"
            )
    else:
        if work.exists():  # resume asked, but the run died before its first record: start over
            shutil.rmtree(work)
        state = {
            "version": STATE_VERSION,
            "fingerprint": fp,
            "done": -1,  # -1: nothing; 0: the head tensors and the first block's inputs are written
            "records": {},
            "aliases": {},
            "layer_sparsity": {},
            "zeros": 0,
            "total": 0,
            "n_batches": [],
        }
    (work / "shards").mkdir(parents=True, exist_ok=True)
    resumed_from = max(state["done"], 0)

    def commit() -> None:
        write_text_atomic(state_path, json.dumps(state))

    # Workers: this process (sharing the shell) or remote ones that build their own.
    gram = config.needs_hessian
    local = not workers
    if local:
        workers = [BlockWorker(None, str(work / "acts" / "w0"), gram, shell=shell)]
    call = _local_call(workers) if local else _remote_call(workers)
    shares = None
    if calibration is not None:
        shares = [s for s in calibration.tensor_split(len(workers)) if s.shape[0]]
        if len(shares) != len(workers):
            raise SparselandError(f"{len(workers)} workers need at least {len(workers)} calibration windows")

    def _start_run(state, commit) -> None:
        # The head tensors (embeddings, final norm, untied lm_head), dense in their stored dtype.
        head = {}
        for name in sorted(n for n in expected if not n.startswith("model.layers.")):
            if name == "lm_head.weight" and tied:
                state["aliases"][name] = "model.embed_tokens.weight"
                continue
            rec, stored = _encode(name, reader.get(source[name]), compress=False)
            state["records"][name] = rec
            head.update(stored)
        _save_shard(work / "shards" / "head.safetensors", head)
        del head
        if shares is not None:
            embed = reader.get(source["model.embed_tokens.weight"]).float()
            state["n_batches"] = call("capture", per=[(s, calib_batch, embed) for s in shares])
            del embed
        state["done"] = 0
        commit()

    if state["done"] < 0:
        try:
            _start_run(state, commit)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing a resume could use was recorded
            raise
    elif shares is not None:
        call("attach_batches", per=[(nb,) for nb in state["n_batches"]])

    report = OffloadReport(
        method=config.kind,
        pattern=config.pattern,
        target_sparsity=float(config.sparsity),
        allocation=config.allocation,
        block_sparsity=[float(config.sparsity)] * n_blocks,
        calibration_windows=0 if calibration is None else int(calibration.shape[0]),
        resumed_from=resumed_from,
        workers=len(workers),
    )
    tokens = 0 if calibration is None else int(calibration.numel())
    bar = tqdm(
        total=n_blocks, initial=state["done"], desc=f"prune {config.kind} (offload)", unit="block", disable=not progress
    )
    index = sum(len(block_linears(layers[i], f"model.layers.{i}", filter_fn)) for i in range(state["done"]))
    try:
        for i in range(state["done"], n_blocks):
            t0 = time.perf_counter()
            prefix = f"model.layers.{i}."
            block = layers[i]
            src = {k[len(prefix) :]: reader.get(k) for k in reader.where if k.startswith(prefix)}
            src_dtype = {k: v.dtype for k, v in src.items()}
            materialize(block, src)
            if not local and shares is not None:
                call("load_block", i, {k: v.float() for k, v in src.items()})
            elif shares is not None:
                workers[0].load_block(i, None)
            del src
            linears = block_linears(block, f"model.layers.{i}", filter_fn)
            rel = {full[len(prefix) :]: mod for full, mod in linears.items()}
            position = {name: index + k for k, name in enumerate(linears)}
            parity = i % 2
            sparsity = report.block_sparsity[i]

            def prune(name, mod, stats, sparsity=sparsity, position=position) -> None:
                from sparseland.weights.pruner import quantize_pruned_

                W = mod.weight.data
                if config.quant is not None:
                    quantize_pruned_(mod, config, sparsity, stats, name, position[name])
                else:
                    W.copy_(prune_weight(W, config, sparsity, stats, name, position[name]))

            if config.needs_calibration:
                done: list[str] = []
                while len(done) < len(rel):
                    found = sum_stats(call("stage_stats", parity, list(rel), done))
                    if found is None:
                        missing = next(n for n in rel if n not in done)
                        raise SparselandError(
                            f"{prefix}{missing} was not called in its block's forward; leave it out with filter_fn"
                        )
                    group, st = found
                    for n in group:
                        prune(prefix + n, rel[n], st)
                    done.extend(group)
                    if not local:
                        call("set_weights", {n: rel[n].weight.data for n in group})
            else:
                for n, mod in rel.items():
                    prune(prefix + n, mod, None)
                if not local and shares is not None:
                    call("set_weights", {n: m.weight.data for n, m in rel.items()})
            if shares is not None and i + 1 < n_blocks:
                call("advance", parity)

            # Encode the block into its shard (Linear weights compressed, in the shards' dtype).
            from sparseland.quant.apply import quant_state

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
                if mod_name in rel:
                    z = int((t == 0).sum())
                    state["layer_sparsity"][full.removesuffix(".weight")] = z / t.numel()
                    state["zeros"] += z
                    state["total"] += t.numel()
            _save_shard(work / "shards" / f"block-{i:05d}.safetensors", tensors)
            del tensors
            if not local:
                call("drop_block", True)
            elif shares is not None:
                workers[0].drop_block(False)
            release(block)
            index += len(linears)
            state["done"] = i + 1
            commit()
            dt = time.perf_counter() - t0
            report.block_seconds.append(dt)
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / dt:.0f}" if tokens else "-", peak_rss=f"{peak_rss_mb():.0f}MB")
            if on_block_done is not None:
                on_block_done(i)
    finally:
        bar.close()

    # Assemble the checkpoint in a temporary directory and rename it into place.
    from sparseland.runtime.checkpoint import FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE

    report.layer_sparsity = state["layer_sparsity"]
    report.overall_sparsity = state["zeros"] / state["total"] if state["total"] else 0.0
    report.peak_rss_mb = peak_rss_mb()
    report.seconds = time.perf_counter() - start
    cfg = hf_config.to_dict()
    cfg.pop("quantization_config", None)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "metadata": json.loads(json.dumps({**(metadata or {}), "report": report.to_dict()}, default=str)),
        "model_class": (getattr(hf_config, "architectures", None) or [type(shell).__name__])[0],
        "config": cfg,
        "aliases": state["aliases"],
        "tensors": {k: state["records"][k] for k in sorted(state["records"])},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        shards = [work / "shards" / "head.safetensors"] + [
            work / "shards" / f"block-{i:05d}.safetensors" for i in range(n_blocks)
        ]
        report.checkpoint_bytes = assemble_safetensors(shards, tmp / WEIGHTS_FILE)
        manifest["metadata"]["report"]["checkpoint_bytes"] = report.checkpoint_bytes
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            for pattern in TOKENIZER_GLOBS:
                for f in model_dir.glob(pattern):
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        (tmp / "sparseland.json").write_text(json.dumps(manifest, indent=1, default=str))
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
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


def iter_checkpoint_blocks(path: str | Path, blocks=None):
    """Yield ``(block index or None for the head, {name: dense tensor})`` from a sparse checkpoint, one
    decoder block at a time (tensors read on demand), so a checkpoint bigger than memory can be checked;
    ``blocks``: only these keys (a set of indices, None meaning the head)."""
    from sparseland.runtime.checkpoint import WEIGHTS_FILE, decode_tensor, read_manifest
    from sparseland.runtime.validate import validate_record

    path = Path(path)
    manifest = read_manifest(path)
    reader = ShardReader.__new__(ShardReader)
    reader.dir = path
    header, start = read_safetensors_header(path / WEIGHTS_FILE)
    reader.where = {n: (path / WEIGHTS_FILE, rec, start) for n, rec in header.items()}
    groups: dict[int | None, list[str]] = {}
    for name in manifest["tensors"]:
        parts = name.split(".")
        key = int(parts[2]) if name.startswith("model.layers.") else None
        groups.setdefault(key, []).append(name)
    for key in sorted(groups, key=lambda k: -1 if k is None else k):
        if blocks is not None and key not in blocks:
            continue
        out = {}
        for name in groups[key]:
            rec = manifest["tensors"][name]
            store = {k: reader.get(k) for k in reader.where if k == name or k.startswith(name + ".")}
            validate_record(name, rec, store)
            out[name] = decode_tensor(name, rec, store)
        yield key, out


def _embedded_dir(name: str) -> Path:
    """The on-disk float32 safetensors directory of a known embedded model (converted once if needed)."""
    from sparseland.models.loader import KNOWN_MODELS, _convert_gguf, _embedded_cache_dir, locate_embedded_gguf

    if name not in KNOWN_MODELS:
        return Path(name).expanduser()
    gguf = locate_embedded_gguf(name)
    cached = _embedded_cache_dir(name, gguf)
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return cached


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


__all__ = [
    "BlockWorker",
    "OffloadReport",
    "ShardReader",
    "assemble_safetensors",
    "iter_checkpoint_blocks",
    "model_dir_of",
    "peak_rss_mb",
    "prune_offload",
    "sum_stats",
    "work_dir_for",
]
