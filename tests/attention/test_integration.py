"""Methods applied to a tiny Llama through transformers and through the lean decode loop."""

import pytest
import torch

from sparseland.api import sparsify_
from sparseland.attention import (
    METHODS,
    BlockSparseConfig,
    QuestConfig,
    SnapKVConfig,
    StreamingConfig,
    TidalDecodeConfig,
    XAttentionConfig,
    attention_method,
    make_config,
    measured_sparsity,
    remove,
)
from sparseland.attention.decode import budget
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from tests.conftest import make_tiny_llama

PREFILL = ("streaming", "vertical_slash", "block_sparse", "flexprefill", "xattention")
T = 150


def _cfg(name, sparsity):
    kw = {"block_size": 16} if name in PREFILL else {}
    if name in ("quest", "tidaldecode", "topk"):
        kw["dense_layers"] = 1
    if name == "streaming":
        kw["sink"] = 16
    return make_config(name, sparsity, **kw)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=4, max_pos=512)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(0))


def _hf_greedy(m, ids, n):
    out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_equals_dense_hf_and_lean(model, ids, name):
    remove(model)
    dense = model(ids).logits[0]  # (T, V)
    with torch.no_grad():
        full_seq = torch.cat([ids, torch.randint(3, 256, (1, 6))], 1)
        dense_full = model(full_seq).logits[0]
    sparsify_(model, _cfg(name, 0.0))
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits[0], dense, atol=1e-4, rtol=1e-4)
        dec = LeanDecoder(model, full_seq.shape[1])
        torch.testing.assert_close(dec.step(ids), dense[-1], atol=1e-4, rtol=1e-4)
        for t in range(T, full_seq.shape[1]):  # decode steps through the method
            torch.testing.assert_close(dec.step(full_seq[:, t : t + 1]), dense_full[t], atol=1e-4, rtol=1e-4)
        assert measured_sparsity(model) == pytest.approx(0.0, abs=1e-9)
    finally:
        remove(model)


@pytest.mark.parametrize("name", METHODS)
def test_hf_and_lean_give_same_greedy_tokens(model, ids, name):
    sparsify_(model, _cfg(name, 0.75))
    try:
        want = _hf_greedy(model, ids, 6)
        attention_method(model).reset_stats()
        got = greedy_generate(model, ids, 6, stop_at_eos=False).tokens
        assert got == want
        assert measured_sparsity(model) > 0.15  # the method really skipped work
    finally:
        remove(model)


def test_causal_mask_is_kept(model, ids):
    sparsify_(model, StreamingConfig(block_size=16, sink=16, window=0.3))
    try:
        other = ids.clone()
        other[0, 100:] = (other[0, 100:] + 7) % 256
        mask = torch.ones_like(ids)
        with torch.no_grad():
            a = model(ids, attention_mask=mask).logits[0, :100]
            b = model(other, attention_mask=mask).logits[0, :100]
        torch.testing.assert_close(a, b)  # a future token cannot change earlier logits
        assert len(_hf_greedy(model, ids, 3)) == 3  # generate passes a 2-D mask through the mask function
    finally:
        remove(model)


def test_dropped_mask_function_is_an_error(model, ids, monkeypatch):
    from transformers.masking_utils import AttentionMaskInterface

    sparsify_(model, StreamingConfig(block_size=16))
    try:
        name = model.config._attn_implementation
        monkeypatch.delitem(AttentionMaskInterface._global_mapping, name)
        with pytest.raises(SparselandError, match="mask function is not registered"):
            model(ids)
    finally:
        remove(model)


def test_remove_restores_dense_exactly(model, ids):
    before = model.config._attn_implementation
    dense = model(ids).logits
    sparsify_(model, BlockSparseConfig(block_size=16, keep=0.2))
    assert not torch.equal(model(ids).logits, dense)
    remove(model)
    assert model.config._attn_implementation == before and attention_method(model) is None
    assert torch.equal(model(ids).logits, dense)
    assert greedy_generate(model, ids, 4, stop_at_eos=False).tokens == _hf_greedy(model, ids, 4)


def test_tidaldecode_reuses_selection(model, ids, monkeypatch):
    from sparseland.attention import decode as D

    state = sparsify_(model, TidalDecodeConfig(keep=0.2, dense_layers=1, reselect_layer=3))
    try:
        chosen, used = [], []
        top = D.top_tokens
        monkeypatch.setattr(D, "top_tokens", lambda p, k: chosen.append(top(p, k)) or chosen[-1])
        orig = state._sparse
        state._sparse = lambda q, k, v, idx, scale: used.append(idx) or orig(q, k, v, idx, scale)
        dec = LeanDecoder(model, T + 2)
        dec.step(ids)
        dec.step(ids[:, :1])
        # layer 0 dense, layers 1 and 3 select with full attention, layer 2 reuses layer 1's tokens
        assert len(chosen) == 2 and len(used) == 1
        assert torch.equal(used[0], chosen[0]) and not torch.equal(chosen[0], chosen[1])
        assert used[0].shape == (4, D.budget(0.2, T + 1))
    finally:
        remove(model)


def test_snapkv_decode_attends_window_and_new_tokens(model, ids):
    state = sparsify_(model, SnapKVConfig(keep=0.2, window=8))
    try:
        dec = LeanDecoder(model, T + 3)
        dec.step(ids)
        kept, t = state.layer_state[0]
        assert t == T and kept.shape == (2, 30)  # per KV head (the tiny model has 2)
        assert all(set(range(T - 8, T)) <= set(row.tolist()) for row in kept)
        dec.step(ids[:, :1])
        dec.step(ids[:, :1])
        assert state.stats["decode"][0] == 4 * 4 * (30 + 1) + 4 * 4 * (30 + 2)  # layers x heads x (kept + new)
    finally:
        remove(model)


def test_quest_measured_sparsity(model, ids):
    sparsify_(model, QuestConfig(keep=0.25, page_size=16, dense_layers=0))
    try:
        greedy_generate(model, ids, 3, stop_at_eos=False)
        assert 0.6 < measured_sparsity(model) < 0.8
        assert measured_sparsity(model, "prefill") == 0.0
    finally:
        remove(model)


def test_quest_refine_attends_as_many_keys_as_quest(model, ids):
    measured = []
    for refine in (1.0, 4.0):
        sparsify_(model, QuestConfig(keep=0.25, page_size=4, dense_layers=1, refine=refine))
        try:
            greedy_generate(model, ids, 3, stop_at_eos=False)
            measured.append(measured_sparsity(model))
        finally:
            remove(model)
    assert measured[0] == pytest.approx(measured[1]) and measured[0] > 0.3


def test_batch_of_two_is_rejected(model, ids):
    sparsify_(model, StreamingConfig(block_size=16))
    try:
        with pytest.raises(SparselandError, match="batch size 1"):
            model(ids.repeat(2, 1))
    finally:
        remove(model)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: StreamingConfig(window=0.0), "window"),
        (lambda: BlockSparseConfig(keep=1.5), "keep"),
        (lambda: QuestConfig(page_size=0), "page_size"),
        (lambda: QuestConfig(refine=0.5), "refine"),
        (lambda: XAttentionConfig(block_size=64, stride=5), "stride"),
        (lambda: SnapKVConfig(kernel=4), "kernel"),
        (lambda: make_config("nope", 0.5), "unknown attention method"),
        (lambda: make_config("quest", 1.0), "sparsity"),
    ],
)
def test_configs_validate(build, match):
    with pytest.raises(SparselandError, match=match):
        build()


def test_config_json_round_trip_and_make_config_budgets():
    for name in METHODS:
        cfg = make_config(name, 0.9)
        assert SparsityConfig.from_json(cfg.to_json()) == cfg
    assert make_config("block_sparse", 0.9).keep == pytest.approx(0.1)
    assert make_config("quest", 0.85).keep == pytest.approx(0.15)
    assert make_config("xattention", 0.0).threshold == 1.0


def test_tidaldecode_shared_heads_one_set(model, ids):
    state = sparsify_(model, TidalDecodeConfig(keep=0.2, dense_layers=1, share_heads=True))
    try:
        dec = LeanDecoder(model, T + 2)
        dec.step(ids)
        dec.step(ids[:, :1])
        sel = state.selected
        assert sel.shape == (4, budget(0.2, T + 1)) and (sel == sel[0]).all()
    finally:
        remove(model)
    with pytest.raises(SparselandError, match="share_heads"):
        TidalDecodeConfig(keep=0.2, share_heads="yes").validate()


def test_topk_attends_each_heads_highest_scores(model, ids):
    from sparseland.attention import decode as D

    state = sparsify_(model, make_config("topk", 0.8, dense_layers=1))
    try:
        seen = []
        orig = state._sparse
        state._sparse = lambda q, k, v, idx, scale: seen.append((q, k, idx)) or orig(q, k, v, idx, scale)
        dec = LeanDecoder(model, T + 2)
        dec.step(ids)
        dec.step(ids[:, :1])
        assert len(seen) == 3  # layers 1-3 of 4
        q, k, idx = seen[0]
        probs = D.full_probs(q, k, q.shape[-1] ** -0.5)
        n = D.budget(0.2, T + 1)
        assert idx.shape == (4, n)
        for h in range(4):  # every kept key scores at least the n-th best of its head
            assert probs[h, idx[h]].min() >= probs[h].topk(n).values.min() - 1e-7
        assert measured_sparsity(model) == pytest.approx(0.8 * 3 / 4, abs=0.01)
    finally:
        remove(model)
