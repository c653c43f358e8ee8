"""KV-cache eviction (SnapKV, H2O): per-KV-head selection and the lean loop's compacted cache."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.api import sparsify_
from sparseland.attention import H2OConfig, SnapKVConfig, attention_method, remove
from sparseland.attention import decode as D
from sparseland.errors import SparselandError
from sparseland.runtime.generate import LeanDecoder
from tests.conftest import make_tiny_llama

T, H, KVH, DH, LAYERS = 120, 6, 2, 16, 3  # GQA with groups of 3 query heads


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=LAYERS, hidden=H * DH, heads=H, kv_heads=KVH, max_pos=512, seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(0))


def _methods():
    return [
        SnapKVConfig(keep=0.25, window=8),
        SnapKVConfig(keep=0.25, window=8, group="union"),
        SnapKVConfig(keep=0.25, window=8, group="query"),
        H2OConfig(keep=0.25, recent=0.5),
    ]


METHOD_IDS = ["snapkv", "snapkv-union", "snapkv-query", "h2o"]


def _lean(model, ids, n):
    """Greedy tokens and logits of the lean loop, and the decoder."""
    dec = LeanDecoder(model, ids.shape[1] + n)
    logits = [dec.step(ids)]
    for _ in range(n - 1):
        logits.append(dec.step(logits[-1].argmax().view(1, 1)))
    return [int(x.argmax()) for x in logits], torch.stack(logits), dec


def _hf(model, ids, n):
    out = model.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[0, ids.shape[1] :].tolist(), torch.cat(out.logits)


# ---- the per-KV-head selection functions --------------------------------------------------------------


def test_group_scores_sums_each_kv_heads_query_heads():
    s = torch.arange(12.0).view(6, 2)  # 6 query heads, 2 positions
    assert D.group_scores(s, 2).tolist() == [[0 + 2 + 4, 1 + 3 + 5], [6 + 8 + 10, 7 + 9 + 11]]
    torch.testing.assert_close(D.group_scores(s, 6), s)  # multi-head attention: one head per group


def _votes_reference(q_obs, k, scale):
    """Each window query's softmax over its causal keys, summed over the window, per query head."""
    Hq, w, _ = q_obs.shape
    S, G = k.shape[1], Hq // k.shape[0]
    votes = torch.zeros(Hq, S - w)
    for h in range(Hq):
        for j in range(w):
            p = torch.softmax(k[h // G, : S - w + j + 1] @ q_obs[h, j] * scale, -1)
            votes[h] += p[: S - w]
    return votes


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([(4, 2), (6, 2), (3, 3), (4, 1)]),
    st.integers(1, 60),
    st.sampled_from([1, 3, 5]),
)
def test_snapkv_keeps_window_and_top_of_group_summed_votes(seed, heads, n_keep, kernel):
    g = torch.Generator().manual_seed(seed)
    (Hq, kvh), S, w = heads, 50, 6
    q_obs, k = torch.randn(Hq, w, 8, generator=g), torch.randn(kvh, S, 8, generator=g) * 2
    kept = D.snapkv_select(q_obs, k, n_keep, kernel, 0.4)
    assert kept.shape == (kvh, min(max(n_keep, w), S))
    votes = D.group_scores(_votes_reference(q_obs, k, 0.4), kvh)  # (KVH, S - w)
    pooled = F.max_pool1d(votes.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    for r in range(kvh):
        row = kept[r].tolist()
        assert row == sorted(set(row))  # sorted, no duplicates
        assert set(range(S - w, S)) <= set(row)  # the window is always kept
        top = [p for p in row if p < S - w]
        rest = [p for p in range(S - w) if p not in top]
        if top and rest:  # the kept prefix positions are the top of the pooled group-summed votes
            assert pooled[r, top].min() >= pooled[r, rest].max() - 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 40), st.floats(0, 1))
def test_h2o_keep_recent_share_heavy_hitters_and_budget(seed, S, n_keep, recent):
    scores = torch.rand(3, S, generator=torch.Generator().manual_seed(seed))
    n_recent = round(recent * n_keep)
    kept = D.h2o_keep(scores, n_keep, n_recent)
    assert kept.shape == (3, min(n_keep, S))  # never over budget
    n_rec = min(n_recent, n_keep, S)
    for r in range(3):
        row = kept[r].tolist()
        assert row == sorted(set(row)) and set(range(S - n_rec, S)) <= set(row)  # the recent share is kept
        heavy = [p for p in row if p < S - n_rec]
        rest = [p for p in range(S - n_rec) if p not in heavy]
        if heavy and rest:
            assert scores[r, heavy].min() >= scores[r, rest].max()


def test_h2o_evict_protects_recent_and_swap_remove_moves_last():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.2, 0.3, 0.4, 0.5]])
    pos = torch.tensor([[3, 7, 1, 9], [0, 2, 5, 8]])
    assert D.h2o_evict(scores, pos, 9).tolist() == [1, 0]  # position 9 is recent, so slot 3 is protected
    x = torch.arange(8).view(2, 4).clone()
    assert D.swap_remove(x, torch.tensor([1, 3])).tolist() == [[0, 3, 2], [4, 5, 6]]


# ---- the lean loop's compacted cache ------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SnapKVConfig(keep=1.0, window=8), H2OConfig(keep=1.0)], ids=["snapkv", "h2o"])
def test_full_budget_evicts_nothing_and_equals_dense(model, ids, cfg):
    remove(model)
    want_tok, want_logits, _ = _lean(model, ids, 5)
    sparsify_(model, cfg)
    try:
        tok, logits, dec = _lean(model, ids, 5)
        assert tok == want_tok
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        assert all(dec.compacted) and dec.n_cached == [T + 4] * LAYERS
    finally:
        remove(model)


@pytest.mark.parametrize("cfg", _methods(), ids=METHOD_IDS)
def test_lean_eviction_matches_transformers_path(model, ids, cfg):
    sparsify_(model, cfg)
    try:
        want_tok, want_logits = _hf(model, ids, 8)
        tok, logits, dec = _lean(model, ids, 8)
        assert all(dec.compacted)  # the lean loop really evicted, transformers' cache did not
        assert tok == want_tok
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    finally:
        remove(model)


@pytest.mark.parametrize("cfg", _methods(), ids=METHOD_IDS)
def test_prefill_shrinks_the_cache(model, ids, cfg):
    remove(model)
    n_new = 10
    dense = LeanDecoder(model, T + n_new)
    dense.step(ids)
    sparsify_(model, cfg)
    try:
        dec = LeanDecoder(model, T + n_new)
        assert dec.k_cache is None and dec.kv_cache_bytes() == 0  # nothing full-length is allocated
        dec.step(ids)
        K = D.budget(cfg.keep, T)
        if isinstance(cfg, SnapKVConfig):
            K = max(K, cfg.window)
        assert dec.n_cached == [K] * LAYERS and dec.pos == T
        per_entry = 2 * LAYERS * KVH * DH * 4  # k and v, float32
        rows = H if getattr(cfg, "group", "sum") == "query" else KVH  # a cache row per query head
        assert dense.kv_cache_bytes() == per_entry * (T + n_new)
        # the kept entries + room for the new tokens
        assert dec.kv_cache_bytes() == per_entry * (K + n_new) * rows // KVH
        for i in range(LAYERS):
            assert attention_method(model).kept_positions(i).shape == (rows, K)
        # layer 0's keys depend only on the tokens: the compacted cache holds the dense keys of the kept positions
        kept = attention_method(model).kept_positions(0)
        kv_head = torch.arange(rows)[:, None] // (rows // KVH)  # (rows, 1): the KV head each row reads
        torch.testing.assert_close(dec.k_layers[0][:, :K], dense.k_cache[0][kv_head, kept])
    finally:
        remove(model)


def test_h2o_decode_stays_in_budget_and_cache_matches_positions(model, ids):
    remove(model)
    feed = torch.randint(3, 256, (30, 1, 1), generator=torch.Generator().manual_seed(1))
    dense = LeanDecoder(model, T + len(feed))  # layer 0's keys of every position: they depend on the tokens only
    for x in (ids, *feed):
        dense.step(x)
    cfg = H2OConfig(keep=0.1, recent=0.5)
    state = sparsify_(model, cfg)
    try:
        dec = LeanDecoder(model, T + len(feed))
        dec.step(ids)
        for x in feed:
            dec.step(x)
            S = dec.pos
            n_keep = D.budget(cfg.keep, S)
            assert all(c <= n_keep for c in dec.n_cached)  # never over budget
            pos, scores = state.layer_state[0]
            assert pos.shape == (KVH, dec.n_cached[0]) == scores.shape
            recent = set(range(S - round(cfg.recent * n_keep), S))
            assert all(recent <= set(row.tolist()) for row in pos)  # the recent share is always kept
        assert state.stats["decode"][0] < state.stats["decode"][1] * 0.15
        # the physical cache (after the swap-removes) holds exactly the keys of the positions H2O kept
        rows = torch.arange(KVH)[:, None]
        torch.testing.assert_close(dec.k_layers[0][:, : dec.n_cached[0]], dense.k_cache[0][rows, pos])
    finally:
        remove(model)


def test_decode_attends_the_compacted_cache_and_counts_sparsity(model, ids, monkeypatch):
    state = sparsify_(model, SnapKVConfig(keep=0.25, window=8))
    try:
        seen = []
        orig = state.decode_evicted
        monkeypatch.setattr(
            state, "decode_evicted", lambda i, q, k, v, s, n: seen.append((k.shape, n)) or orig(i, q, k, v, s, n)
        )
        dec = LeanDecoder(model, T + 4)
        dec.step(ids)
        state.reset_stats()
        dec.step(ids[:, :1])
        dec.step(ids[:, :1])
        K = D.budget(0.25, T)
        assert seen == [((KVH, K + 1, DH), T + 1)] * LAYERS + [((KVH, K + 2, DH), T + 2)] * LAYERS
        kept, total = state.stats["decode"]
        assert kept == LAYERS * H * (2 * K + 3) and total == LAYERS * H * (2 * T + 3)  # kept vs full length
        with pytest.raises(SparselandError, match="one token at a time"):
            dec.step(ids[:, :2])
    finally:
        remove(model)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(4, 2), (6, 2), (3, 1)]), st.integers(1, 12))
def test_group_union_gives_every_query_head_its_top_ranks(seed, heads, k):
    Hq, kvh = heads
    G, S = Hq // kvh, 40
    scores = torch.rand(Hq, S, generator=torch.Generator().manual_seed(seed))
    kept = D.group_union_top(scores, kvh, k)
    assert kept.shape == (kvh, k)
    ranks = scores.argsort(-1, descending=True)  # (H, S)
    for g in range(kvh):
        row = set(kept[g].tolist())
        assert len(row) == k
        r = k // G  # rank by rank: every head of the group has at least its top k // G positions kept
        for h in range(g * G, (g + 1) * G):
            assert set(ranks[h, :r].tolist()) <= row
        # and every kept position ranks (at its best head) no worse than every dropped one
        best_rank = {p: min(int((ranks[h] == p).nonzero()) for h in range(g * G, (g + 1) * G)) for p in range(S)}
        assert max(best_rank[p] for p in row) <= min(best_rank[p] for p in set(range(S)) - row)


def test_snapkv_union_keeps_each_heads_best_where_sum_drops_one():
    """Two query heads share a KV head: head 1 splits its attention between positions 5 and 6, head 0
    puts somewhat less on position 20. With room for two, the summed votes keep 5 and 6 and drop head
    0's only choice; the union keeps one of head 1's and head 0's."""
    S, w, D_ = 30, 2, 4
    k = torch.zeros(1, S, D_)
    k[0, 5, 0] = k[0, 6, 0] = 10.0  # what head 1 attends, half each
    k[0, 20, 1] = 3.0  # what head 0 attends (about 0.4 of each query's attention)
    q = torch.zeros(2, w, D_)
    q[1, :, 0] = 2.0
    q[0, :, 1] = 1.0
    summed = D.snapkv_select(q, k, w + 2, 1, 1.0, group="sum")[0].tolist()
    union = D.snapkv_select(q, k, w + 2, 1, 1.0, group="union")[0].tolist()
    assert summed == [5, 6, 28, 29]
    assert 20 in union and len({5, 6} & set(union)) == 1 and union[-2:] == [28, 29]
    with pytest.raises(SparselandError, match="group="):
        SnapKVConfig(group="mean")
