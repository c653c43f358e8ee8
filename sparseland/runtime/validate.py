"""Checks that a sparse checkpoint is well formed before anything decodes it or a kernel indexes with it.

Pure functions over the parsed manifest and the dict of stored tensors: each raises one
``SparselandError`` naming the offending key or tensor and the fix, never a KeyError, IndexError or
RuntimeError from deeper down. ``checkpoint.load_sparse_checkpoint`` calls them in this order:
``validate_manifest`` (JSON keys and types), ``read_store`` (the safetensors file parses),
``validate_record`` for every tensor record (stored tensors exist with the dtype and element count the
record implies, masks and N:M indices are consistent), ``validate_aliases``, and ``validate_shapes``
(the stored shapes match the model the config builds).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sparseland.errors import SparselandError
from sparseland.runtime.packing import combination_bits, unpack_bits, unpack_stream

FORMATS = ("dense", "bitmask", "nm", "quant")
NM_GROUP_SIZES = (4, 8, 16)
RESAVE = "re-save the checkpoint (e.g. rerun `sparseland prune` or `save_sparse_checkpoint`)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(where: str, what: str) -> SparselandError:
    return SparselandError(f"{where}: {what}; the checkpoint is damaged or hand-edited, {RESAVE}")


def dtype_of(name: Any, where: str) -> torch.dtype:
    """The torch dtype a record's ``dtype`` string names (e.g. ``float32``)."""
    dt = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dt, torch.dtype):
        raise _bad(where, f"dtype {name!r} is not a torch dtype")
    return dt


def validate_manifest(manifest: Any, where: str) -> None:
    """Top-level keys and their types (``format``/``version`` are checked by ``read_manifest``)."""
    if not isinstance(manifest, dict):
        raise _bad(where, f"the manifest is a JSON {type(manifest).__name__}, not an object")
    expected = {"config": dict, "aliases": dict, "tensors": dict}
    for key, typ in expected.items():
        if key not in manifest:
            raise _bad(where, f"the manifest has no {key!r} key")
        if not isinstance(manifest[key], typ):
            raise _bad(where, f"{key!r} is a JSON {type(manifest[key]).__name__}, expected an object")
    if "model_class" in manifest and not isinstance(manifest["model_class"], str):
        raise _bad(where, "'model_class' is not a string")
    if not isinstance(manifest["config"].get("model_type"), str):
        raise _bad(where, "'config' has no string 'model_type'")
    for alias, src in manifest["aliases"].items():
        if not isinstance(src, str):
            raise _bad(where, f"alias {alias!r} points at {src!r}, not a tensor name")
    for name, rec in manifest["tensors"].items():
        if not isinstance(rec, dict):
            raise _bad(f"{where}: tensor {name!r}", "its record is not a JSON object")


def read_store(weights: Path) -> dict[str, torch.Tensor]:
    """Load the safetensors file; any parse or read failure becomes a ``SparselandError``."""
    from safetensors.torch import load_file

    if not weights.is_file():
        raise SparselandError(f"{weights} is missing; the checkpoint is incomplete, {RESAVE}")
    try:
        return load_file(str(weights))
    except Exception as exc:  # SafetensorError, OSError, decode errors: all mean an unreadable file
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SparselandError(f"{weights} is not a readable safetensors file ({msg}); {RESAVE}") from exc


def _shape(name: str, rec: dict[str, Any], dims: int | None = None) -> list[int]:
    shape = rec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise _bad(f"checkpoint tensor {name!r}", f"shape {shape!r} is not a list of non-negative integers")
    if dims is not None and len(shape) != dims:
        raise _bad(f"checkpoint tensor {name!r}", f"shape {shape} is not {dims}-D as its {rec['format']!r} needs")
    return shape


def _int_field(name: str, rec: dict[str, Any], key: str, lo: int = 0) -> int:
    v = rec.get(key)
    if not _is_int(v) or v < lo:
        raise _bad(f"checkpoint tensor {name!r}", f"{key!r} is {v!r}, expected an integer >= {lo}")
    return v


def need(store: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The stored tensor ``key``, checked to have ``dtype`` and ``numel`` elements."""
    t = store.get(key)
    if t is None or t.dtype != dtype or t.numel() != numel:
        got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} with {t.numel()} elements"
        want = f"{str(dtype).removeprefix('torch.')} with {numel}"
        raise _bad(f"checkpoint tensor {key!r}", f"it is {got}, expected {want}")
    return t


def validate_record(name: str, rec: dict[str, Any], store: dict[str, torch.Tensor]) -> None:
    """Check one tensor record against the stored tensors it names (sizes before any unpacking)."""
    where = f"checkpoint tensor {name!r}"
    fmt = rec.get("format")
    if fmt not in FORMATS:
        raise SparselandError(
            f"{where} has unknown format {fmt!r} (known: {', '.join(FORMATS)}); was it written by a newer "
            f"sparseland? Upgrade sparseland or {RESAVE}"
        )
    if fmt == "quant":  # the stored tensors are checked by checkpoint.decode_quant
        from sparseland.quant.scheme import QuantScheme

        if not isinstance(rec.get("scheme"), str):
            raise _bad(where, f"'scheme' is {rec.get('scheme')!r}, not a string such as 'int4-g32'")
        QuantScheme.parse(rec["scheme"]).group_size(_shape(name, rec, 2)[1])
        if not isinstance(rec.get("sparse", False), bool):
            raise _bad(where, f"'sparse' is {rec.get('sparse')!r}, not true or false")
        if rec.get("sparse"):
            _int_field(name, rec, "nnz")
        return
    shape = _shape(name, rec, None if fmt == "dense" else 2)
    dtype = dtype_of(rec.get("dtype"), where)
    numel = math.prod(shape)
    if fmt == "dense":
        t = store.get(name)
        if t is None or t.dtype != dtype or list(t.shape) != shape:
            got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            raise _bad(where, f"it is {got}, the record says {rec.get('dtype')} {shape}")
        return
    if not dtype.is_floating_point:
        raise _bad(where, f"dtype {rec.get('dtype')!r} is not a floating-point dtype, as {fmt!r} needs")
    nnz = _int_field(name, rec, "nnz")
    if fmt == "bitmask":
        mask = need(store, f"{name}.mask", torch.uint8, (numel + 7) // 8)
        kept = int(unpack_bits(mask, numel).sum())
        if kept != nnz:
            raise _bad(where, f"its mask keeps {kept} entries, the record's nnz is {nnz}")
        need(store, f"{name}.values", dtype, nnz)
        return
    # nm
    n, m, b = (_int_field(name, rec, k, 1) for k in ("n", "m", "index_bits"))
    if m not in NM_GROUP_SIZES or n >= m:
        raise _bad(where, f"N:M pattern {n}:{m} is not one of N < M with M in {NM_GROUP_SIZES}")
    if b != combination_bits(n, m):
        raise _bad(where, f"index_bits is {b}, but {n}:{m} uses {combination_bits(n, m)}")
    rows, cols = shape
    if cols % m:
        raise _bad(where, f"shape {shape} has {cols} columns, not a multiple of M={m}")
    groups = rows * (cols // m)
    if nnz > groups * n:
        raise _bad(where, f"nnz {nnz} exceeds the {groups * n} entries {n}:{m} keeps")
    need(store, f"{name}.values", dtype, groups * n)
    idx = need(store, f"{name}.indices", torch.uint8, (groups * b + 7) // 8)
    ranks = unpack_stream(idx, b, groups)
    limit = math.comb(m, n)
    if groups and int(ranks.max()) >= limit:
        bad = int((ranks >= limit).nonzero()[0])
        raise _bad(where, f"group {bad} has index rank {int(ranks[bad])}, but {n}:{m} has only {limit} index sets")


def validate_aliases(aliases: dict[str, str], records: dict[str, Any], where: str) -> None:
    for alias, src in aliases.items():
        if src not in records:
            raise _bad(f"{where}: alias {alias!r}", f"it points at {src!r}, which is not a stored tensor")
        if alias in records:
            raise _bad(f"{where}: alias {alias!r}", "it is also a stored tensor")


def validate_shapes(
    records: dict[str, Any], aliases: dict[str, str], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Every stored and aliased tensor has the shape the model (built from the config) expects."""
    names = {**{k: k for k in records}, **aliases}
    for name, src in names.items():
        if name not in expected:
            raise _bad(f"{where}: tensor {name!r}", "the model its config builds has no such tensor")
        shape = tuple(records[src]["shape"])
        if shape != expected[name]:
            via = f" (alias of {src!r})" if src != name else ""
            raise _bad(
                f"{where}: tensor {name!r}{via}", f"its shape {list(shape)} is not the model's {list(expected[name])}"
            )
    missing = [k for k in expected if k not in names]
    if missing:
        raise _bad(where, f"tensors the config needs are missing: {missing[:5]}")
