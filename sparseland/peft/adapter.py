"""Sparse adapters: the delta values and where they go, as a file, and an exact merge / unmerge.

An ``Adapter`` maps weight names (``model.layers.0.mlp.down_proj.weight``) to ``TensorDelta``s: sorted
flat indices into the weight and one value per index, or -- for structured methods (S2FT) -- whole
columns and a dense ``(out, n_cols)`` block of values. An optional low-rank part (``LowRankDelta``:
``B @ A * scale``, optionally masked to the weight's nonzeros) carries the LoRA of sparse + low-rank.

File (one safetensors file, written atomically): per tensor the values in their dtype and the index
set in the smaller of two encodings, chosen per tensor:

* ``bitmask``: one bit per weight (``numel / 8`` bytes), best above ~1/4 density;
* ``elias-fano``: the sorted indices as Elias-Fano codes, ``k * (2 + floor(log2(numel / k)))`` bits at
  most -- the compact form of "sorted indices" (raw int32 indices would cost 32 bits each);
* ``columns``: the column indices (int32) of a structured delta;
* ``seeded``: a fixed random index set (SHiRA's random mask, SLTrain's random support on a dense weight)
  is a function of its seed and the weight's shape, so only the seed and a SHA-256 of the indices are
  stored; loading regenerates the indices and refuses them if the hash differs (another torch's generator).

Merge adds the deltas to the weights in place and returns a ``MergeRecord`` holding the overwritten
base values; unmerge writes them back, so merge then unmerge returns the base bits exactly, whatever
the float rounding of ``base + delta`` was. The merged weights are the same numbers the training
forward computed (``index_add`` of the same fp32 values), so the merged model is the trained model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from sparseland.errors import SparselandError

FORMAT = "sparseland-peft-v1"


# ----------------------------------------------------------------------------------------------- codes
def elias_fano_encode(indices: np.ndarray, universe: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted unique ints in ``[0, universe)`` -> (low bits packed, high bits unary packed, L)."""
    idx = np.asarray(indices, dtype=np.int64)
    k = idx.size
    if k == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.uint8), 0
    if np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= universe:
        raise SparselandError("Elias-Fano needs sorted unique indices inside the universe")
    low_bits = max(0, int(math.floor(math.log2(universe / k)))) if universe > k else 0
    low = idx & ((1 << low_bits) - 1)
    low_packed = np.packbits(((low[:, None] >> np.arange(low_bits)) & 1).astype(np.uint8).ravel(), bitorder="little")
    high = idx >> low_bits
    bits = np.zeros(k + (universe >> low_bits) + 1, dtype=np.uint8)
    bits[high + np.arange(k)] = 1
    return low_packed, np.packbits(bits, bitorder="little"), low_bits


def elias_fano_decode(low_packed: np.ndarray, high_packed: np.ndarray, low_bits: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, np.int64)
    ones = np.flatnonzero(np.unpackbits(high_packed, bitorder="little"))[:k]
    high = ones.astype(np.int64) - np.arange(k)
    if low_bits == 0:
        return high
    low = np.unpackbits(low_packed, bitorder="little")[: k * low_bits].reshape(k, low_bits).astype(np.int64)
    return (high << low_bits) | (low << np.arange(low_bits)).sum(1)


def index_bytes(k: int, numel: int) -> dict[str, int]:
    """Bytes of each index encoding for ``k`` of ``numel`` positions."""
    low = max(0, int(math.floor(math.log2(numel / k)))) if 0 < k < numel else 0
    ef = math.ceil(k * low / 8) + math.ceil((k + (numel >> low) + 1) / 8)
    return {"bitmask": math.ceil(numel / 8), "elias-fano": ef, "int32": 4 * k}


def _seeded_indices(shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    from sparseland.peft.select import shira_indices

    return shira_indices(torch.empty(shape, device="meta"), k, "random", seed)


def _sha(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- deltas
@dataclasses.dataclass
class TensorDelta:
    """A sparse update of one weight: ``values`` at sorted flat ``indices``, or a column block."""

    shape: tuple[int, ...]
    values: torch.Tensor  # (k,) for element form; (out, n_cols) for column form
    indices: torch.Tensor | None = None  # (k,) int64 sorted flat indices (element form)
    cols: torch.Tensor | None = None  # (n_cols,) int64 sorted column indices (column form)
    seed: int | None = None  # indices are SHiRA's seeded random choice: the file stores the seed, not them

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if (self.indices is None) == (self.cols is None):
            raise SparselandError("a TensorDelta needs exactly one of indices or cols")
        if self.indices is not None and self.indices.shape != self.values.shape:
            raise SparselandError(f"{self.indices.numel()} indices but {self.values.numel()} values")
        if self.cols is not None and tuple(self.values.shape) != (self.shape[0], self.cols.numel()):
            raise SparselandError(f"column block {tuple(self.values.shape)} does not fit {self.shape}")

    @property
    def n_params(self) -> int:
        return self.values.numel()

    def flat_indices(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices
        rows = torch.arange(self.shape[0])[:, None] * self.shape[1]
        return (rows + self.cols[None, :]).flatten()


@dataclasses.dataclass
class LowRankDelta:
    """``scale * B @ A`` added to one weight (the LoRA part of sparse + low-rank); ``masked``: only where
    the base weight is nonzero (keeps a pruned weight's zeros)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    masked: bool = False

    @property
    def n_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def dense(self, base: torch.Tensor) -> torch.Tensor:
        d = (self.b.double() @ self.a.double() * self.scale).to(base.dtype)
        return d * (base != 0) if self.masked else d


@dataclasses.dataclass
class Adapter:
    deltas: dict[str, TensorDelta]
    low_rank: dict[str, LowRankDelta] = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(d.n_params for d in self.deltas.values()) + sum(d.n_params for d in self.low_rank.values())


# ----------------------------------------------------------------------------------------------- file
def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` to one safetensors file (temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, d in adapter.deltas.items():
        tensors[f"{name}.values"] = d.values.detach().contiguous()
        numel = math.prod(d.shape)
        entry = {"shape": list(d.shape), "k": d.n_params}
        if d.cols is not None:
            entry["encoding"] = "columns"
            tensors[f"{name}.cols"] = d.cols.to(torch.int32)
        elif d.seed is not None and torch.equal(_seeded_indices(d.shape, d.n_params, d.seed), d.indices):
            entry.update(encoding="seeded", seed=d.seed, sha256=_sha(d.indices))
        else:
            sizes = index_bytes(d.n_params, numel)
            idx = d.indices.numpy()
            if sizes["bitmask"] <= sizes["elias-fano"]:
                bits = np.zeros(numel, np.uint8)
                bits[idx] = 1
                entry["encoding"] = "bitmask"
                tensors[f"{name}.bitmask"] = torch.from_numpy(np.packbits(bits, bitorder="little"))
            else:
                low, high, low_bits = elias_fano_encode(idx, numel)
                entry.update(encoding="elias-fano", low_bits=low_bits)
                tensors[f"{name}.ef_low"] = torch.from_numpy(low)
                tensors[f"{name}.ef_high"] = torch.from_numpy(high)
        layout[name] = entry
    for name, lr in adapter.low_rank.items():
        tensors[f"{name}.lora_a"] = lr.a.detach().contiguous()
        tensors[f"{name}.lora_b"] = lr.b.detach().contiguous()
        layout[name + "#lora"] = {"scale": lr.scale, "masked": lr.masked}
    meta = {"format": FORMAT, "layout": json.dumps(layout), "metadata": json.dumps(adapter.metadata)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_adapter(path: str | Path) -> Adapter:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SparselandError(f"adapter file {str(path)!r} does not exist; pass the adapter.safetensors of a run")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise SparselandError(
            f"{path} is not a readable safetensors file ({exc}); pass an adapter.safetensors"
        ) from exc
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SparselandError(f"{path} is not a sparseland adapter (format {meta.get('format')!r}, want {FORMAT})")
        layout = json.loads(meta["layout"])
        deltas: dict[str, TensorDelta] = {}
        low_rank: dict[str, LowRankDelta] = {}
        for key, entry in layout.items():
            if key.endswith("#lora"):
                name = key.removesuffix("#lora")
                low_rank[name] = LowRankDelta(
                    f.get_tensor(f"{name}.lora_a"), f.get_tensor(f"{name}.lora_b"), entry["scale"], entry["masked"]
                )
                continue
            values, shape, k = f.get_tensor(f"{key}.values"), tuple(entry["shape"]), entry["k"]
            enc = entry["encoding"]
            if enc == "columns":
                deltas[key] = TensorDelta(shape, values, cols=f.get_tensor(f"{key}.cols").long())
                continue
            if enc == "seeded":
                idx_t = _seeded_indices(shape, k, entry["seed"])
                if _sha(idx_t) != entry["sha256"]:
                    raise SparselandError(
                        f"{path}: the seeded index set of {key!r} regenerates differently with this torch "
                        f"({torch.__version__}); load it with the torch that saved it"
                    )
                deltas[key] = TensorDelta(shape, values, indices=idx_t, seed=entry["seed"])
                continue
            if enc == "bitmask":
                bits = np.unpackbits(f.get_tensor(f"{key}.bitmask").numpy(), bitorder="little")
                idx = np.flatnonzero(bits[: math.prod(shape)])
            else:
                low, high = f.get_tensor(f"{key}.ef_low").numpy(), f.get_tensor(f"{key}.ef_high").numpy()
                idx = elias_fano_decode(low, high, entry["low_bits"], k)
            deltas[key] = TensorDelta(shape, values, indices=torch.from_numpy(np.ascontiguousarray(idx)).long())
    return Adapter(deltas, low_rank, json.loads(meta.get("metadata", "{}")))


# ----------------------------------------------------------------------------------------------- merge
@dataclasses.dataclass
class MergeRecord:
    """The base values a merge overwrote: flat indices and old values per weight (dense copy for low rank)."""

    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]]


def _params(model: torch.nn.Module, adapter: Adapter) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    for name in list(adapter.deltas) + list(adapter.low_rank):
        if name not in params:
            raise SparselandError(f"the adapter updates {name!r}, which this model does not have; wrong base model?")
        shape = adapter.deltas[name].shape if name in adapter.deltas else None
        if shape is not None and tuple(params[name].shape) != shape:
            raise SparselandError(f"{name!r} has shape {tuple(params[name].shape)} here, {shape} in the adapter")
    return params


@torch.no_grad()
def merge_adapter_(model: torch.nn.Module, adapter: Adapter) -> MergeRecord:
    """Add the adapter into the weights in place; returns what ``unmerge_adapter_`` needs to undo it."""
    params = _params(model, adapter)
    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for name, lr in adapter.low_rank.items():
        w = params[name]
        saved[name] = (None, w.detach().clone())
        w.add_(lr.dense(w))
    for name, d in adapter.deltas.items():
        flat = params[name].view(-1)
        idx = d.flat_indices()
        if name not in saved:
            saved[name] = (idx, flat[idx].clone())
        flat.index_add_(0, idx, d.values.reshape(-1).to(flat.dtype))
    return MergeRecord(saved)


@torch.no_grad()
def unmerge_adapter_(model: torch.nn.Module, record: MergeRecord) -> None:
    """Write back the base values a merge overwrote: the weights are bit-identical to before the merge."""
    params = dict(model.named_parameters())
    for name, (idx, old) in record.saved.items():
        if idx is None:
            params[name].copy_(old)
        else:
            params[name].view(-1)[idx] = old
