"""Scores and masks: exact sparsity per comparison group, N:M really N:M, Wanda vs magnitude."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.weights import (
    is_nm,
    magnitude_scores,
    nm_mask,
    parse_pattern,
    random_scores,
    unstructured_mask,
    wanda_scores,
)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_unstructured_mask_exact_per_row(rows, cols, sparsity, seed):
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = unstructured_mask(scores, sparsity)
    k = int(cols * sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert ((~mask).sum(1) == k).all()
    if 0 < k < cols:  # every dropped score is <= every kept score of its row
        dropped_max = torch.where(~mask, scores, torch.tensor(-float("inf"))).max(1).values
        kept_min = torch.where(mask, scores, torch.tensor(float("inf"))).min(1).values
        assert (dropped_max <= kept_min).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 6), m=st.integers(2, 8), data=st.data())
def test_nm_mask_is_nm(rows, groups, m, data):
    n = data.draw(st.integers(1, m - 1))
    scores = torch.randn(rows, groups * m)
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
    assert is_nm(torch.randn(rows, groups * m) * mask, n, m)
    # the kept entries are the n largest of each group
    g = scores.reshape(rows, groups, m)
    kth = g.topk(n, dim=-1).values[..., -1:]
    assert (g[mask.reshape(rows, groups, m)].reshape(rows, groups, n) >= kth).all()


def test_nm_indivisible_names_layer():
    with pytest.raises(SparselandError, match="model.layers.3.mlp.down_proj.*divisible by M=8"):
        nm_mask(torch.randn(4, 12), 2, 8, name="model.layers.3.mlp.down_proj")


def test_wanda_equals_magnitude_with_equal_norms():
    W = torch.randn(16, 32)
    a = unstructured_mask(wanda_scores(W, torch.full((32,), 3.7)), 0.5)
    b = unstructured_mask(magnitude_scores(W), 0.5)
    assert torch.equal(a, b)
    assert torch.equal(nm_mask(wanda_scores(W, torch.full((32,), 0.2)), 2, 4), nm_mask(magnitude_scores(W), 2, 4))


def test_wanda_uses_input_norms():
    W = torch.ones(1, 4)
    mask = unstructured_mask(wanda_scores(W, torch.tensor([1.0, 5.0, 0.1, 3.0])), 0.5)
    assert mask.tolist() == [[False, True, False, True]]


def test_random_scores_seeded():
    W = torch.empty(8, 8)
    assert torch.equal(random_scores(W, 3), random_scores(W, 3))
    assert not torch.equal(random_scores(W, 3), random_scores(W, 4))


@pytest.mark.parametrize(
    ("text", "expected"), [("unstructured", None), ("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ("1:16", (1, 16))]
)
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "half", "2:4:8", ""])
def test_bad_pattern(text):
    with pytest.raises(SparselandError, match="pattern"):
        parse_pattern(text)
