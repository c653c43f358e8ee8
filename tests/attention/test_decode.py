"""Decode selections: Quest's bound, TidalDecode's top tokens, SnapKV's window, H2O's cache."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseland.attention import decode as D
from sparseland.attention.ops import ref_dense_decode_attention, ref_sparse_decode_attention


@given(st.integers(0, 10_000), st.sampled_from([4, 8, 16]), st.integers(1, 5))
def test_quest_upper_bound_dominates_true_scores(seed, page, n_pages):
    g = torch.Generator().manual_seed(seed)
    H, KVH, Dh = 4, 2, 8
    k = torch.randn(KVH, page * n_pages, Dh, generator=g) * 3
    q = torch.randn(H, Dh, generator=g)
    kmin, kmax = D.quest_page_bounds(k, page)
    ub = D.quest_upper_bound(q, kmin, kmax)  # (H, P)
    true = torch.einsum("hd,hsd->hs", q, k.repeat_interleave(2, 0)).view(H, n_pages, page).amax(-1)
    assert (ub >= true - 1e-5).all()


def test_quest_select_pages_and_tail():
    g = torch.Generator().manual_seed(0)
    H, KVH, S, Dh, page = 4, 2, 70, 8, 16
    k, q = torch.randn(KVH, S, Dh, generator=g), torch.randn(H, Dh, generator=g)
    kmin, kmax = D.quest_page_bounds(k, page)
    idx = D.quest_select(q, kmin, kmax, S, page, 2)
    assert idx.shape == (H, 2 * page + S % page)
    assert (idx[:, -(S % page) :] == torch.arange(64, 70)).all()  # the partial page is always attended
    ub = D.quest_upper_bound(q, kmin, kmax)
    for h in range(H):
        chosen = set((idx[h, : 2 * page] // page).tolist())
        assert chosen == set(ub[h].topk(2).indices.tolist())


@given(st.integers(0, 10_000), st.sampled_from([2, 4, 8]), st.integers(1, 4))
def test_quest_refine_one_is_quest_and_all_pages_is_exact_top_k(seed, page, n_pages):
    g = torch.Generator().manual_seed(seed)
    H, KVH, Dh = 6, 2, 8
    S = page * 6 + seed % page
    k, q = torch.randn(KVH, S, Dh, generator=g), torch.randn(H, Dh, generator=g)
    kmin, kmax = D.quest_page_bounds(k, page)
    plain = D.quest_select(q, kmin, kmax, S, page, n_pages)
    assert torch.equal(D.quest_refine_select(q, k, kmin, kmax, S, page, n_pages, 1.0), plain)
    # every page a candidate: the exact top keys of the full pages, plus the partial one
    every = D.quest_refine_select(q, k, kmin, kmax, S, page, n_pages, 100.0)
    assert every.shape == plain.shape
    full = 6 * page
    scores = torch.einsum("hd,hsd->hs", q, k.repeat_interleave(H // KVH, 0))[:, :full]
    expect = scores.topk(n_pages * page, dim=-1).indices.sort(-1).values
    assert torch.equal(every[:, : n_pages * page], expect)
    assert (every[:, n_pages * page :] == torch.arange(full, S)).all()


def test_quest_refine_keeps_the_best_keys_of_the_candidate_pages():
    g = torch.Generator().manual_seed(1)
    H, KVH, S, Dh, page, n_pages = 4, 2, 64, 8, 4, 2
    k, q = torch.randn(KVH, S, Dh, generator=g), torch.randn(H, Dh, generator=g)
    kmin, kmax = D.quest_page_bounds(k, page)
    idx = D.quest_refine_select(q, k, kmin, kmax, S, page, n_pages, 3.0)
    ub = D.quest_upper_bound(q, kmin, kmax)
    scores = torch.einsum("hd,hsd->hs", q, k.repeat_interleave(2, 0))
    for h in range(H):
        cand = ub[h].topk(6).indices  # ceil(3 * 2) candidate pages
        cand_tok = (cand[:, None] * page + torch.arange(page)).reshape(-1)
        assert set((idx[h] // page).tolist()) <= set(cand.tolist())
        assert scores[h, idx[h]].min() >= scores[h, cand_tok].topk(n_pages * page).values.min()


def test_sparse_decode_with_all_positions_is_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 8, generator=g), torch.randn(2, 40, 8, generator=g), torch.randn(2, 40, 8, generator=g)
    idx = torch.arange(40).expand(6, -1)
    torch.testing.assert_close(ref_sparse_decode_attention(q, k, v, idx), ref_dense_decode_attention(q, k, v))
    torch.testing.assert_close(
        torch.einsum("hs,hsd->hd", D.full_probs(q, k, 8**-0.5), v.repeat_interleave(3, 0)),
        ref_dense_decode_attention(q, k, v),
    )


def test_top_tokens_are_most_attended():
    probs = torch.softmax(torch.randn(3, 50), -1)
    sel = D.top_tokens(probs, 7)
    for h in range(3):
        assert probs[h, sel[h]].min() >= probs[h].topk(7).values.min()


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 40))
def test_shared_top_tokens_union_of_rankings(seed, H, k):
    probs = torch.softmax(torch.randn(H, 40, generator=torch.Generator().manual_seed(seed)), -1)
    sel = D.shared_top_tokens(probs, k)
    assert sel.shape == (H, k) and (sel == sel[0]).all()  # one set for every head, the full budget
    row = sel[0]
    assert len(set(row.tolist())) == k and torch.equal(row, row.sort().values)
    ranks = probs.argsort(-1, descending=True)  # (H, 40)
    assert set(ranks[:, : k // H].flatten().tolist()) <= set(row.tolist())  # each head's first k // H
    union: list[int] = []  # the first k distinct positions taken rank by rank, head by head
    for p in ranks.t().flatten().tolist():
        if p not in union:
            union.append(p)
    assert set(row.tolist()) == set(union[:k])
    if H == 1:
        assert torch.equal(row, D.top_tokens(probs, k)[0])


def test_snapkv_keeps_window_and_votes():
    g = torch.Generator().manual_seed(0)
    H, KVH, S, Dh, w = 4, 2, 100, 8, 10
    k = torch.randn(KVH, S, Dh, generator=g)
    q = torch.randn(H, w, Dh, generator=g)
    k[:, 17] = q[:, :].mean(1).view(KVH, 2, Dh).mean(1) * 20  # a key every window query loves
    kept = D.snapkv_select(q, k, 30, 1, Dh**-0.5)
    assert kept.shape == (KVH, 30)  # one selection per KV head
    assert all(set(range(S - w, S)) <= set(row.tolist()) for row in kept)
    assert (kept == 17).any(-1).all()
    assert D.snapkv_select(q, k, 5, 7, 1.0).shape == (KVH, w)  # budget below the window: the window only


def test_h2o_keep_recent_and_heavy():
    scores = torch.tensor([[5.0, 0.1, 3.0, 0.2, 0.0, 0.0, 0.0]])
    assert D.h2o_keep(scores, 4, 2).tolist() == [[0, 2, 5, 6]]
    q, k = torch.randn(2, 9, 4), torch.randn(1, 9, 4)
    acc = D.accumulated_attention(q, k, 0.5, chunk=4)
    torch.testing.assert_close(acc.sum(-1), torch.full((2,), 9.0))  # each query's row sums to 1
    assert acc[:, -1].lt(1.0 + 1e-6).all()  # the last key is seen by one query only
