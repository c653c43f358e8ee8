"""Adapter files (index encodings, round trip, size) and the exact merge / unmerge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.peft.adapter import (
    Adapter,
    LowRankDelta,
    TensorDelta,
    elias_fano_decode,
    elias_fano_encode,
    index_bytes,
    load_adapter,
    merge_adapter_,
    save_adapter,
    unmerge_adapter_,
)


@given(st.integers(1, 5000), st.data())
def test_elias_fano_round_trip(universe, data):
    k = data.draw(st.integers(0, min(universe, 300)))
    idx = np.sort(np.random.default_rng(universe * 31 + k).choice(universe, k, replace=False)).astype(np.int64)
    low, high, low_bits = elias_fano_encode(idx, universe)
    assert np.array_equal(elias_fano_decode(low, high, low_bits, k), idx)
    if k:
        assert low.nbytes + high.nbytes <= index_bytes(k, universe)["elias-fano"]


def test_elias_fano_is_near_the_entropy_bound_and_beats_int32():
    sizes = index_bytes(4000, 1_000_000)  # density 0.4%
    bits = 8 * sizes["elias-fano"] / 4000
    assert bits <= 2 + np.log2(1_000_000 / 4000) + 0.01  # Elias-Fano's bound: 2 + log2(n/k) bits
    assert sizes["elias-fano"] < sizes["bitmask"] < sizes["int32"] * 10 and sizes["elias-fano"] < sizes["int32"] / 3
    with pytest.raises(SparselandError):
        elias_fano_encode(np.array([3, 1]), 10)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))


def _adapter(model, dense_k=600):
    g = torch.Generator().manual_seed(1)
    w0, w1 = model[0].weight, model[1].weight
    sparse_idx = torch.randperm(w0.numel(), generator=g)[:12].sort().values
    dense_idx = torch.randperm(w1.numel(), generator=g)[:dense_k].sort().values  # > 1/4 density: bitmask
    return Adapter(
        {
            "0.weight": TensorDelta(w0.shape, torch.randn(12, generator=g) * 1e-3, indices=sparse_idx),
            "1.weight": TensorDelta(w1.shape, torch.randn(dense_k, generator=g), indices=dense_idx),
        },
        {"0.weight": LowRankDelta(torch.randn(2, 40, generator=g), torch.randn(30, 2, generator=g), 0.5)},
        {"note": "test"},
    )


def test_save_load_round_trip_picks_the_smaller_encoding(tmp_path):
    from safetensors import safe_open

    m = _model()
    a = _adapter(m)
    cols = TensorDelta((20, 30), torch.randn(20, 3), cols=torch.tensor([2, 5, 9]))
    a.deltas["1.bias_like"] = cols
    path = save_adapter(a, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert {"0.weight.ef_low", "1.weight.bitmask", "1.bias_like.cols"} <= keys
    b = load_adapter(path)
    assert b.metadata == {"note": "test"} and b.n_params == a.n_params
    for name, d in a.deltas.items():
        e = b.deltas[name]
        assert torch.equal(d.values, e.values) and torch.equal(d.flat_indices(), e.flat_indices())
    lr = b.low_rank["0.weight"]
    assert torch.equal(lr.a, a.low_rank["0.weight"].a) and lr.scale == 0.5
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_merge_then_unmerge_returns_the_base_bits():
    m = _model()
    with torch.no_grad():
        m[0].weight[0, :5] = torch.tensor([1.0, 3.0, -7.0, 1e8, 0.1])  # base + delta rounds: subtracting fails
    base = {k: v.clone() for k, v in m.state_dict().items()}
    a = _adapter(m)
    a.deltas["0.weight"] = TensorDelta((30, 40), torch.full((5,), 1e-7 / 3), indices=torch.arange(5))
    record = merge_adapter_(m, a)
    w = m[0].weight.detach().flatten()
    assert not torch.equal(w, base["0.weight"].flatten())
    naive = w[:5] - torch.full((5,), 1e-7 / 3)  # subtracting the delta back does not give the base (rounding)
    assert not torch.equal(naive, base["0.weight"].flatten()[:5])
    unmerge_adapter_(m, record)
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k
        assert torch.equal(v.view(torch.int32), base[k].view(torch.int32))  # the bits, -0.0 included


def test_merged_weights_equal_what_the_training_forward_computes():
    m = _model()
    a = _adapter(m)
    del a.low_rank["0.weight"]
    d = a.deltas["1.weight"]
    expected = m[1].weight.detach().reshape(-1).index_add(0, d.indices, d.values).view(20, 30)
    merge_adapter_(m, a)
    assert torch.equal(m[1].weight.detach(), expected)


def test_masked_low_rank_keeps_zeros_and_bad_adapters_are_refused(tmp_path):
    m = _model()
    with torch.no_grad():
        m[0].weight[:, ::2] = 0
    zeros = m[0].weight == 0
    a = Adapter({}, {"0.weight": LowRankDelta(torch.randn(2, 40), torch.randn(30, 2), 1.0, masked=True)})
    merge_adapter_(m, a)
    assert torch.equal(m[0].weight == 0, zeros)
    with pytest.raises(SparselandError, match="wrong base model"):
        merge_adapter_(m, Adapter({"2.weight": TensorDelta((1, 1), torch.zeros(1), indices=torch.zeros(1).long())}))
    with pytest.raises(SparselandError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(SparselandError, match="not a readable"):
        load_adapter(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(SparselandError, match="not a sparseland adapter"):
        load_adapter(tmp_path / "y.safetensors")


def test_seeded_random_sets_store_only_the_seed(tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sparseland.peft.select import shira_indices

    shape = (64, 96)
    idx = shira_indices(torch.empty(shape), 40, "random", seed=7)
    values = torch.randn(40)
    seeded = Adapter({"w": TensorDelta(shape, values, indices=idx, seed=7)})
    plain = Adapter({"w": TensorDelta(shape, values, indices=idx)})
    a = save_adapter(seeded, tmp_path / "seeded.safetensors")
    b = save_adapter(plain, tmp_path / "plain.safetensors")
    assert a.stat().st_size < b.stat().st_size
    back = load_adapter(a).deltas["w"]
    assert torch.equal(back.indices, idx) and torch.equal(back.values, values)
    wrong = Adapter({"w": TensorDelta(shape, values, indices=idx, seed=8)})  # seed does not give these indices
    assert "w.ef_low" in load_file(str(save_adapter(wrong, tmp_path / "w.safetensors")))  # stored explicitly
    with safe_open(str(a), framework="pt") as f:
        meta = f.metadata()
    layout = _json.loads(meta["layout"])
    layout["w"]["seed"] = 8  # a file whose seed no longer reproduces its indices is refused
    save_file(load_file(str(a)), str(tmp_path / "t.safetensors"), metadata={**meta, "layout": _json.dumps(layout)})
    with pytest.raises(SparselandError, match="regenerates differently"):
        load_adapter(tmp_path / "t.safetensors")
