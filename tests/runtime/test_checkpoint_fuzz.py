"""Fuzz the sparse checkpoint loader: a damaged checkpoint loads into a model that runs, or raises
``SparselandError`` - never a KeyError, IndexError, RuntimeError or SafetensorError traceback.

One valid checkpoint (a tiny Llama pruned 50%, one Linear 2:4, one Linear quantized int4-g32 with a
mask) is built once per session; each example writes a mutated copy (truncated or bit-flipped
safetensors bytes, edited JSON fields, deleted/swapped/resized tensors, corrupted mask bytes) and loads
it. ``SPARSELAND_FUZZ_EXAMPLES=2000`` raises the example count (default 200).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.runtime.checkpoint import WEIGHTS_FILE, load_sparse_checkpoint, save_sparse_checkpoint
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import magnitude_prune_

EXAMPLES = int(os.environ.get("SPARSELAND_FUZZ_EXAMPLES", "200"))
NM_LINEAR = "model.layers.0.mlp.up_proj"
QUANT_LINEAR = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """(manifest dict, safetensors bytes, stored tensors, scratch dir) of one valid checkpoint."""
    from safetensors.torch import load_file

    from sparseland.quant.apply import attach
    from sparseland.quant.scheme import quantize_rtn

    model = make_tiny_llama(layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1, vocab=64, max_pos=64)
    up = model.get_submodule(NM_LINEAR).weight
    dense_up = up.detach().clone()
    magnitude_prune_(model, 0.5)
    with torch.no_grad():  # this one Linear is 2:4 instead
        up.copy_(dense_up)
        g = up.view(up.shape[0], -1, 4)
        g.scatter_(-1, g.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    o = model.get_submodule(QUANT_LINEAR)
    attach(o, quantize_rtn(o.weight.data, "int4-g32", o.weight.data != 0))
    root = tmp_path_factory.mktemp("fuzz")
    ck = save_sparse_checkpoint(model, None, root / "base", metadata={"sparsity": 0.5})
    manifest = json.loads((ck / "sparseland.json").read_text())
    formats = {rec["format"] for rec in manifest["tensors"].values()}
    assert {"dense", "bitmask", "nm", "quant"} <= formats, formats
    assert manifest["aliases"], "the tied lm_head should be an alias"
    load_sparse_checkpoint(ck)  # the base itself loads
    return manifest, (ck / WEIGHTS_FILE).read_bytes(), load_file(str(ck / WEIGHTS_FILE)), root / "case"


# ----- mutations ------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**63, -(2**40), 10**12]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["dense", "bitmask", "nm", "quant", "csr", "float32", "bfloat16", "float16", "uint8", "int4-g32"]),
    st.sampled_from(["int8", "int64", "bool", "int4-g7", "", "float", "Tensor", "__class__", "x" * 40]),
    st.lists(st.integers(-2, 70), max_size=3),
    st.dictionaries(st.sampled_from(["a", "format", "shape"]), st.integers(0, 4), max_size=2),
)


def _paths(obj, prefix=()):
    """Every (path to a value) in a JSON tree."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def mutate_json(data, manifest: dict) -> dict:
    manifest = copy.deepcopy(manifest)
    paths = [p for p in _paths(manifest) if p and p[0] != "metadata"]
    # most edits hit the tensor records and aliases, the rest anywhere (config included)
    focus = [p for p in paths if p[0] in ("tensors", "aliases")]
    path = data.draw(st.sampled_from(focus) if data.draw(st.integers(0, 3)) else st.sampled_from(paths))
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["set", "set", "delete", "nudge"]))
    key = path[-1]
    if action == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif action == "nudge" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += data.draw(st.sampled_from([-8, -1, 1, 8]))
    else:
        parent[key] = data.draw(JSON_VALUES)
    event(f"json {action} {'/'.join(str(p) for p in path[:1])}")
    return manifest


def mutate_store(data, store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    store = dict(store)
    keys = sorted(store)
    kind = data.draw(st.sampled_from(["delete", "swap", "resize", "retype", "mask"]))
    event(f"store {kind}")
    k = data.draw(st.sampled_from(keys))
    if kind == "delete":
        del store[k]
    elif kind == "swap":
        same = [j for j in keys if store[j].shape == store[k].shape and store[j].dtype == store[k].dtype]
        k2 = data.draw(st.sampled_from(same if data.draw(st.booleans()) else keys))
        store[k], store[k2] = store[k2], store[k]
    elif kind == "resize":
        t = store[k].reshape(-1)
        n = data.draw(st.integers(0, t.numel() + 9))
        store[k] = torch.cat([t, t.new_zeros(max(0, n - t.numel()))])[:n].clone()
    elif kind == "retype":
        dt = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.int64]))
        store[k] = store[k].to(dt)
    else:  # corrupt mask (or N:M index) bytes so the popcounts / ranks disagree with the record
        masks = [k for k in keys if k.endswith((".mask", ".indices"))]
        k = data.draw(st.sampled_from(masks))
        t = store[k].clone()
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, t.numel() - 1))
            t[i] ^= data.draw(st.integers(1, 255))
        store[k] = t
    return store


def mutate_bytes(data, raw: bytes) -> bytes:
    if data.draw(st.booleans()):
        event("bytes truncate")
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    event("bytes flip")
    b = bytearray(raw)
    header = 8 + int.from_bytes(raw[:8], "little")
    # flips in the 8-byte length or the JSON header (where they matter most), anywhere, or only in the
    # tensor data (values, masks, indices, codes: often still a loadable checkpoint)
    lo, hi = data.draw(st.sampled_from([(0, header - 1), (0, len(b) - 1), (header, len(b) - 1)]))
    for _ in range(data.draw(st.integers(1, 6))):
        b[data.draw(st.integers(lo, hi))] ^= data.draw(st.integers(1, 255))
    return bytes(b)


# ----- the property -----------------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_damaged_checkpoint_loads_and_runs_or_raises_sparseland_error(base_checkpoint, data):
    from safetensors.torch import save

    manifest, raw, store, case = base_checkpoint
    kinds = data.draw(st.lists(st.sampled_from(["json", "store", "bytes"]), min_size=1, max_size=3, unique=True))
    if "json" in kinds:
        manifest = mutate_json(data, manifest)
    if "store" in kinds:
        raw = save(mutate_store(data, store), metadata={"format": "pt"})
    if "bytes" in kinds:
        raw = mutate_bytes(data, raw)
    case.mkdir(parents=True, exist_ok=True)
    (case / "sparseland.json").write_text(json.dumps(manifest))
    (case / WEIGHTS_FILE).write_bytes(raw)
    try:
        model, _ = load_sparse_checkpoint(case)
    except SparselandError as exc:
        assert "\n" not in str(exc), str(exc)
        event("SparselandError")
        return
    event("loaded")
    vocab = model.config.vocab_size
    ids = torch.arange(3).remainder(vocab).view(1, 3)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, vocab)


def test_base_checkpoint_round_trips(base_checkpoint):
    manifest, raw, _, case = base_checkpoint
    Path(case).mkdir(parents=True, exist_ok=True)
    (case / "sparseland.json").write_text(json.dumps(manifest))
    (case / WEIGHTS_FILE).write_bytes(raw)
    model, _ = load_sparse_checkpoint(case)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
