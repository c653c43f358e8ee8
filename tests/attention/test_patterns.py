"""Prefill block masks: causal, within budget, reaching their cumulative thresholds."""

import math

import pytest
import torch

from sparseland.attention import patterns as P
from sparseland.attention.ops import ref_block_sparse_attention

H, KVH, T, D, BS = 4, 2, 150, 16, 16
NB = math.ceil(T / BS)
SCALE = D**-0.5


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(H, T, D, generator=g), torch.randn(KVH, T, D, generator=g)


def _causal(mask):
    return not bool((mask & ~P.causal_blocks(mask.shape[-1])).any())


def test_block_pair_counts_sum_to_causal_pairs():
    counts = P.block_pair_counts(T, BS)
    assert counts.sum() == T * (T + 1) / 2
    assert counts[1, 0] == BS * BS and counts[0, 0] == BS * (BS + 1) / 2 and counts[0, 1] == 0


@pytest.mark.parametrize("sink,window", [(1, 2), (2, 3), (0, 1)])
def test_streaming_keeps_exactly_sink_plus_window(sink, window):
    m = P.streaming_mask(H, T, BS, sink, window)
    assert m.shape == (H, NB, NB) and _causal(m)
    for i in range(NB):
        want = set(range(min(sink, i + 1))) | set(range(max(0, i - window + 1), i + 1))
        assert set(torch.nonzero(m[0, i]).flatten().tolist()) == want


@pytest.mark.parametrize("keep", [0.1, 0.35, 1.0])
def test_block_topk_counts_and_choice(qk, keep):
    q, k = qk
    m = P.block_topk_mask(q, k, BS, keep, SCALE)
    assert _causal(m) and m[:, torch.arange(NB), torch.arange(NB)].all()
    cap = P.row_cap(NB, keep)
    assert torch.equal(m.sum(-1), cap.expand(H, NB))
    # the kept off-diagonal blocks are the best-scored ones by pooled q . k
    qp, kp = P._pool(q, BS), P._pool(k.repeat_interleave(2, 0), BS)
    s = (qp @ kp.transpose(-1, -2))[0, NB - 1, : NB - 1]
    kept = m[0, NB - 1, : NB - 1]
    if kept.any() and (~kept).any():
        assert s[kept].min() >= s[~kept].max()


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.95])
def test_keep_cumulative_reaches_threshold_with_fewest_blocks(threshold):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(H, NB, NB, generator=g) ** 4
    m = P.keep_cumulative(probs, threshold)
    p = probs.masked_fill(~P.causal_blocks(NB), 0)
    p = p / p.sum(-1, keepdim=True)
    reached = (p * m).sum(-1)
    assert (reached >= threshold - 1e-5).all() and _causal(m)
    # dropping the smallest kept non-diagonal block falls below the threshold (minimality)
    for h in range(H):
        for i in range(1, NB):
            off = m[h, i].clone()
            off[i] = False
            if off.any():
                smallest = p[h, i][off].min()
                assert reached[h, i] - smallest < threshold + 1e-5


def test_keep_cumulative_cap_and_full():
    probs = torch.rand(H, NB, NB)
    cap = P.row_cap(NB, 0.2)
    assert (P.keep_cumulative(probs, 1.0, cap).sum(-1) <= cap).all()
    assert torch.equal(P.keep_cumulative(probs, 1.0), P.causal_blocks(NB).expand(H, NB, NB))


def test_vertical_slash_counts(qk):
    q, k = qk
    m = P.vertical_slash_mask(q, k, BS, 32, 0.2, 0.2, SCALE)
    assert _causal(m) and m[:, :, 0].all() and m[:, torch.arange(NB), torch.arange(NB)].all()
    n = math.ceil(0.2 * NB)
    for h in range(H):
        cols = m[h, -1].nonzero().flatten()  # last row: every kept column shows, plus kept diagonals
        assert len(cols) <= 2 * n
    full = P.vertical_slash_mask(q, k, BS, 32, 1.0, 1.0, SCALE)
    assert torch.equal(full, P.causal_blocks(NB).expand(H, NB, NB))


def test_vertical_slash_parts_total_mass(qk):
    q, k = qk
    probs = P._last_queries_probs(q, k, 20, SCALE)  # (H, 20, T), rows sum to 1
    vert, _ = P.vertical_slash_parts(probs, BS)
    torch.testing.assert_close(vert.sum(-1), torch.full((H,), 20.0))


def test_xattention_scores_are_row_distributions_and_threshold(qk):
    q, k = qk
    s = P.xattention_scores(q, k, BS, 4, SCALE)
    torch.testing.assert_close(s.sum(-1), torch.full((H, NB), BS / 4.0))  # BS/stride strided rows per block
    assert (s.masked_fill(P.causal_blocks(NB), 0) == 0).all()
    m = P.xattention_mask(q, k, BS, 4, 0.8, 1.0, SCALE)
    assert m[:, :, 0].all() and _causal(m)
    share = (s * m).sum(-1) / s.sum(-1)
    assert (share >= 0.8 - 1e-5).all()


def test_flexprefill_tau_switches_pattern(qk):
    q, k = qk
    _, qa_all = P.flexprefill_mask(q, k, BS, 0.9, 1.0, 1.0, SCALE)  # sqrt(JS) <= sqrt(ln 2) < 1
    _, qa_none = P.flexprefill_mask(q, k, BS, 0.9, 0.0, 1.0, SCALE)
    assert qa_all.all() and not qa_none.any()
    m, _ = P.flexprefill_mask(q, k, BS, 0.5, 0.1, 0.3, SCALE)
    assert _causal(m) and (m.sum(-1) <= P.row_cap(NB, 0.3)).all()
    full, _ = P.flexprefill_mask(q, k, BS, 1.0, 0.1, 1.0, SCALE)
    assert torch.equal(full, P.causal_blocks(NB).expand(H, NB, NB))


def test_reference_kernel_full_mask_is_dense(qk):
    q, k = qk
    v = torch.randn(KVH, T, D)
    full = torch.ones(H, NB, NB, dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ref_block_sparse_attention(q, k, v, full, BS), want)


def test_block_topk_sink_blocks_always_kept_within_the_count(qk):
    q, k = qk
    m = P.block_topk_mask(q, k, BS, 0.35, SCALE, sink_blocks=1)
    cap = P.row_cap(NB, 0.35)
    assert torch.equal(m.sum(-1), cap.expand(H, NB)) and _causal(m)
    assert m[:, cap >= 2, 0].all()  # every query block with room for two keeps the sink block
