"""Sparse checkpoints: a model directory whose Linear weights store their zeros compressed.

Directory layout (written to ``<out>.tmp-*`` and renamed, so it is never half-written)::

    sparseland.json      {"format": "sparseland-sparse-checkpoint", "version": 1,
                          "metadata": {...caller's dict...}, "model_class": "LlamaForCausalLM",
                          "config": {...HF config.to_dict()...}, "aliases": {name: stored_name},
                          "tensors": {name: {"format": "dense"|"bitmask"|"nm", "shape": [...],
                                  "dtype": "float32", "nnz": int, "n": N, "m": M, "index_bits": b}}}
    model.safetensors    the tensors below (no pickle)
    tokenizer files      whatever ``tokenizer.save_pretrained`` writes (absent if no tokenizer was given)

Per-tensor encodings (``W`` is a Linear weight of shape (out, in), flattened row-major; a "zero" is the
+0.0 bit pattern, so -0.0 and every other value round-trip bit-exactly):

- ``dense``:   key ``name`` holds the tensor as is (every non-Linear tensor, and any Linear weight for
  which no compressed encoding is smaller).
- ``bitmask``: ``name.mask`` uint8, ceil(out*in/8) bytes, bit ``k % 8`` (LSB first) of byte ``k // 8``
  is 1 when element ``k`` is nonzero; ``name.values`` (nnz,) the nonzero values in row-major order,
  in the tensor's dtype. Bytes: out*in/8 + nnz*itemsize (50% sparse fp32: 2.125 of 4 B/weight, 0.53x).
- ``nm``:      every group of M consecutive entries in a row holds at most N nonzeros.
  ``name.values`` (out * in/M * N,) the N kept values per group in group order (padded with zeros
  taken from zero positions); ``name.indices`` uint8 bit stream: per group (row-major), the rank of
  its ascending set of N kept positions among all C(M, N) such sets in lexicographic order, written
  as an ``index_bits``-bit field (ceil(log2 C(M, N)): 3 for 2:4, 7 for 4:8), LSB first.
  Bytes: out*in*N/M * itemsize + out*in/M * index_bits/8 (2:4 fp32: 2.094 B/weight, 0.52x).

- ``quant``:   a quantized weight (``sparseland.quant``; record: ``scheme`` such as ``int4-g32``,
  ``sparse``, ``nnz``). ``name.codes`` uint8: the codes of the kept entries in row-major order, two
  4-bit codes per byte (low nibble first) or one 8-bit code per byte; ``name.scale`` float16 (out, G);
  ``name.offset`` float16 (out, G) for an asymmetric scheme; ``name.mask`` (if ``sparse``) packed bits as
  in ``bitmask``. The float weight is rebuilt as ``scale * code + offset`` (``QuantizedWeight.dequantize``)
  and the module gets its ``QuantizedWeight`` back, so the runtime can use the quantized kernels.
  Bytes: kept * bits/8 + scales (+ out*in/8 if sparse): int4-g32 is 0.625 B/weight (5 bits, Q4_1's size).

For each Linear weight the writer picks the smallest of dense, bitmask and nm (M in 4, 8, 16); a
quantized weight (embeddings included) is always written as ``quant``.
Tied tensors (lm_head tied to the embeddings) are stored once; ``aliases`` maps the others to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparseland.errors import SparselandError
from sparseland.io import atomic_directory
from sparseland.runtime.packing import (
    combination_bits,
    max_nonzeros_per_group,
    nm_merge,
    nm_split,
    nonzero_mask,
    pack_bits,
    pack_stream,
    rank_combinations,
    unpack_bits,
    unpack_stream,
    unrank_combinations,
)
from sparseland.runtime.validate import (
    RESAVE,
    need,
    read_store,
    validate_aliases,
    validate_manifest,
    validate_record,
    validate_shapes,
)

FORMAT_NAME = "sparseland-sparse-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
NM_GROUP_SIZES = (4, 8, 16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_tensor(name: str, w: torch.Tensor, compress: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Choose the smallest encoding for ``w``; returns (format record, tensors to store)."""
    w = w.detach().contiguous().cpu()
    rec: dict[str, Any] = {"format": "dense", "shape": list(w.shape), "dtype": _dtype_name(w.dtype)}
    best: tuple[int, dict[str, Any], dict[str, torch.Tensor]] = (w.numel() * w.element_size(), rec, {name: w})
    if not compress or w.dim() != 2 or not w.is_floating_point():
        return best[1], best[2]
    item = w.element_size()
    nz = nonzero_mask(w)
    nnz = int(nz.sum())
    size = (w.numel() + 7) // 8 + nnz * item
    if size < best[0]:
        r = {**rec, "format": "bitmask", "nnz": nnz}
        best = (size, r, {f"{name}.mask": pack_bits(nz), f"{name}.values": w[nz]})
    for m in NM_GROUP_SIZES:
        n = max_nonzeros_per_group(w, m)
        if n is None or n >= m:
            continue
        n = max(n, 1)
        b = combination_bits(n, m)
        groups = w.numel() // m
        size = groups * n * item + (groups * b + 7) // 8
        if size < best[0]:
            vals, idx = nm_split(w, n, m)
            r = {**rec, "format": "nm", "nnz": nnz, "n": n, "m": m, "index_bits": b}
            best = (
                size,
                r,
                {
                    f"{name}.values": vals.reshape(-1),
                    f"{name}.indices": pack_stream(rank_combinations(idx, m), b),
                },
            )
    return best[1], best[2]


def encode_quant(name: str, qw: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``quant`` record and tensors of a ``QuantizedWeight``."""
    from sparseland.runtime.packing import pack_fields

    kept = qw.codes if qw.mask is None else qw.codes[qw.mask]
    codes = pack_fields(kept, 4) if qw.scheme.bits == 4 else kept.reshape(-1).to(torch.uint8)
    rec = {
        "format": "quant",
        "shape": list(qw.shape),
        "dtype": "float32",
        "scheme": qw.scheme.name,
        "sparse": qw.mask is not None,
        "nnz": int(kept.numel()),
    }
    tensors = {f"{name}.codes": codes.contiguous(), f"{name}.scale": qw.scale.contiguous()}
    if qw.offset is not None:
        tensors[f"{name}.offset"] = qw.offset.contiguous()
    if qw.mask is not None:
        tensors[f"{name}.mask"] = pack_bits(qw.mask)
    return rec, tensors


_need = need  # the stored tensor, checked to have the dtype and element count the record implies


def decode_quant(name: str, rec: dict[str, Any], store: dict[str, torch.Tensor]) -> Any:
    """The ``QuantizedWeight`` of a ``quant`` record, every stored tensor checked against the record."""
    from sparseland.quant.scheme import QuantizedWeight, QuantScheme
    from sparseland.runtime.packing import unpack_fields

    scheme = QuantScheme.parse(rec["scheme"])
    out, inp = (int(v) for v in rec["shape"])
    G = inp // scheme.group_size(inp)
    mask = None
    kept = out * inp
    if rec.get("sparse"):
        mask = unpack_bits(_need(store, f"{name}.mask", torch.uint8, (out * inp + 7) // 8), out * inp).view(out, inp)
        kept = int(mask.sum())
        if kept != rec.get("nnz"):
            raise SparselandError(
                f"checkpoint tensor {name!r}: the mask keeps {kept} entries, the record says {rec.get('nnz')}"
            )
    nbytes = (kept + 1) // 2 if scheme.bits == 4 else kept
    packed = _need(store, f"{name}.codes", torch.uint8, nbytes)
    flat = unpack_fields(packed, 4, kept).to(torch.uint8) if scheme.bits == 4 else packed.reshape(-1)
    if mask is None:
        codes = flat.view(out, inp).clone()
    else:
        codes = torch.zeros(out, inp, dtype=torch.uint8)
        codes[mask] = flat
    scale = _need(store, f"{name}.scale", torch.float16, out * G).view(out, G)
    offset = None
    if not scheme.symmetric:
        offset = _need(store, f"{name}.offset", torch.float16, out * G).view(out, G)
    return QuantizedWeight(scheme, codes, scale, offset, mask)


def decode_tensor(name: str, rec: dict[str, Any], store: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the dense tensor described by ``rec`` from the stored tensors."""
    fmt, shape = rec["format"], rec["shape"]
    if fmt == "dense":
        return store[name]
    if fmt == "quant":
        return decode_quant(name, rec, store).dequantize()
    numel = 1
    for s in shape:
        numel *= s
    values = store[f"{name}.values"]
    if fmt == "bitmask":
        mask = unpack_bits(store[f"{name}.mask"], numel)
        out = values.new_zeros(numel)
        out[mask] = values
        return out.view(shape)
    if fmt == "nm":
        n, m = rec["n"], rec["m"]
        rows, cols = shape
        groups = rows * (cols // m)
        idx = unrank_combinations(unpack_stream(store[f"{name}.indices"], rec["index_bits"], groups), n, m)
        return nm_merge(values.view(rows, cols // m, n), idx.view(rows, cols // m, n), m)
    raise SparselandError(f"tensor {name!r} has unknown format {fmt!r}; was it written by a newer sparseland?")


def save_sparse_checkpoint(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, *, metadata: dict) -> Path:
    """Write ``model`` (+ ``tokenizer``, may be None) as a sparse checkpoint directory; returns its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise SparselandError(f"{out_dir} already exists; choose a new output directory or delete it first")
    from sparseland.quant.apply import quant_state

    linear_weights = {
        f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    quantized = {}
    for n, m in model.named_modules():
        qw = quant_state(m)
        if qw is not None:
            quantized[f"{n}.weight" if n else "weight"] = qw
    from sparseland.runtime.experts import merged_state_dict

    state = merged_state_dict(model)  # split MoE experts (activations/experts.py) as the 3-D weights again
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    records: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    # Store non-Linear tensors first, so a tied lm_head is recorded as an alias of the embedding.
    for name in sorted(state, key=lambda k: k in linear_weights):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), tuple(t.shape))
        if key in seen and t.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if name in quantized:
            records[name], stored = encode_quant(name, quantized[name])
        else:
            records[name], stored = encode_tensor(name, t, compress=name in linear_weights)
        tensors.update(stored)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "metadata": metadata,
        "model_class": type(model).__name__,
        "config": cfg,
        "aliases": aliases,
        "tensors": records,
    }
    from sparseland.moe.checkpoint import moe_spec

    if moe := moe_spec(model):  # MoE-fied MLPs: their layout, so the loader can rebuild them
        manifest["moe"] = moe
    with atomic_directory(out_dir) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "sparseland.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out_dir


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``sparseland.json`` of a checkpoint directory, its keys and types checked."""
    path = Path(path)
    file = path / "sparseland.json"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparselandError(f"{file} does not exist; pass a checkpoint written by `sparseland prune`") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SparselandError(f"{file} is not readable JSON ({exc}); {RESAVE}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SparselandError(f"{path}/sparseland.json is not a sparseland sparse checkpoint")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SparselandError(f"{file}: 'version' is {version!r}, not an integer; {RESAVE}")
    if version > FORMAT_VERSION:
        raise SparselandError(
            f"{path} uses checkpoint format {manifest['version']}, newer than this sparseland "
            f"({FORMAT_VERSION}); upgrade sparseland"
        )
    validate_manifest(manifest, str(file))
    return manifest


def _build_config(path: Path, manifest: dict[str, Any]):
    """The HF config of the manifest and the tensor shapes the model it builds expects (no allocation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(manifest["config"])
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and layers > len(manifest["tensors"]):  # every layer stores tensors
        raise SparselandError(
            f"{path}/sparseland.json: the config has {layers} layers but only {len(manifest['tensors'])} tensors "
            f"are stored; {RESAVE}"
        )
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for a bad config; all mean the same here
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SparselandError(
            f"{path}/sparseland.json: its config does not build a model ({type(exc).__name__}: {msg}); {RESAVE}"
        ) from exc
    from sparseland.moe.checkpoint import install_moe_

    with torch.device("meta"):
        install_moe_(meta, manifest.get("moe"), f"{path}/sparseland.json")
    return config, {k: tuple(v.shape) for k, v in meta.state_dict().items()}


def _smoke_forward(path: Path, model: torch.nn.Module) -> None:
    """One token through the model: a config value that builds but breaks the forward (a hand-edited
    ``output_hidden_states``, say) is an error here, at load time, not deep inside the first real call."""
    if not getattr(model.config, "vocab_size", 1):
        return
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long))
    except Exception as exc:  # any failure of the forward means the same: the config does not run
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SparselandError(
            f"{path}/sparseland.json: the model its config builds does not run ({type(exc).__name__}: {msg}); {RESAVE}"
        ) from exc


def load_sparse_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """Rebuild ``(model, tokenizer)`` from a sparse checkpoint; weights bit-exact (in their saved dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    config, expected = _build_config(path, manifest)
    store = read_store(path / WEIGHTS_FILE)
    for name, rec in manifest["tensors"].items():
        validate_record(name, rec, store)
    validate_aliases(manifest["aliases"], manifest["tensors"], str(path))
    validate_shapes(manifest["tensors"], manifest["aliases"], expected, str(path))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from sparseland.moe.checkpoint import install_moe_

    install_moe_(model, manifest.get("moe"), f"{path}/sparseland.json")
    from sparseland.quant.apply import attach

    quantized = {
        name: decode_quant(name, rec, store) for name, rec in manifest["tensors"].items() if rec["format"] == "quant"
    }
    state = {
        name: quantized[name].dequantize() if name in quantized else decode_tensor(name, rec, store)
        for name, rec in manifest["tensors"].items()
    }
    for alias, src in manifest["aliases"].items():
        state[alias] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in state]
    if missing or unexpected:
        raise SparselandError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    for name, qw in quantized.items():  # the modules get their QuantizedWeight back
        attach(model.get_submodule(name.removesuffix(".weight").removesuffix("weight").rstrip(".")), qw)
    _smoke_forward(path, model.eval())
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise SparselandError(
                f"{path}: the tokenizer files do not load ({type(exc).__name__}); save the tokenizer again "
                "(tokenizer.save_pretrained(DIR))"
            ) from exc
    return model.eval(), tokenizer


def checkpoint_bytes(path: str | Path) -> int:
    """Total bytes of the weights file of a checkpoint directory."""
    return (Path(path) / WEIGHTS_FILE).stat().st_size
