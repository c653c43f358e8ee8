"""Pure tensor functions: thresholds hit their quantile, masks keep what they say, R-Sparse is exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.activations import core


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 64), c=st.integers(1, 32), s=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_quantile_threshold_drops_the_target_fraction(n: int, c: int, s: float, seed: int) -> None:
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed))  # (n, C), distinct values
    t = core.quantile_threshold(x.abs(), s)
    dropped = int((~core.threshold_mask(x, t)).sum())
    assert dropped == round(s * n * c)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 48), s=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_topk_mask_keeps_exactly_k_per_token(c: int, s: float, seed: int) -> None:
    scores = torch.rand(3, 5, c, generator=torch.Generator().manual_seed(seed))  # (B, T, C)
    keep = core.keep_count(c, s)
    m = core.topk_mask(scores, keep)
    assert (m.sum(-1) == keep).all()
    if 0 < keep < c:  # every kept score beats every dropped one
        assert (scores.masked_fill(~m, 2).amin(-1) >= scores.masked_fill(m, -1).amax(-1)).all()


def test_scaled_thresholds_equal_a_threshold_on_the_score() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, 16, generator=g).abs()  # (n, C)
    scale = torch.rand(16, generator=g) + 0.1  # (C,)
    t = core.scaled_thresholds(v, scale, 0.4)  # (C,)
    tau = core.quantile_threshold(v * scale, 0.4)
    assert ((v > t) != (v * scale > tau)).sum() <= 2  # equal up to float rounding at the boundary
    assert abs((v <= t).float().mean().item() - 0.4) < 0.01


def test_wina_with_equal_column_norms_is_teal_topk() -> None:
    x = torch.randn(2, 7, 40)  # (B, T, C)
    keep = core.keep_count(40, 0.5)
    wina = core.topk_mask(core.wina_scores(x, torch.full((40,), 3.0)), keep)
    teal = core.topk_mask(x.abs(), keep)
    assert torch.equal(wina, teal)


def test_rsparse_full_rank_is_the_dense_layer() -> None:
    w, b = torch.randn(24, 40), torch.randn(24)  # (out, in)
    x = torch.randn(5, 40)
    keep = core.threshold_mask(x, core.quantile_threshold(x.abs(), 0.7))
    a, bb = core.lowrank_factors(w, rank=40)
    got = core.rsparse_linear(x, w, b, keep, a, bb)  # (5, 24)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    # rank 0 part aside, the sparse product is the masked product
    torch.testing.assert_close(core.sparse_linear(x, w, b, keep), F.linear(x * keep, w, b))


def test_lowrank_error_shrinks_with_rank() -> None:
    w = torch.randn(32, 32)
    factors = [core.lowrank_factors(w, r) for r in (4, 16, 32)]
    errs = [torch.linalg.matrix_norm(w - a @ b).item() for a, b in factors]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3
