"""Each method's defining selection rule, on small tensors."""

from __future__ import annotations

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.peft.select import (
    lift_indices,
    low_rank_approx,
    s2ft_columns,
    shira_indices,
    spiel_update,
)


def _w(seed=0, shape=(24, 40)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_shira_random_is_seeded_and_magnitude_takes_the_largest():
    w = _w()
    a, b, c = (shira_indices(w, 50, "random", s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 50 and torch.all(a[1:] > a[:-1])  # sorted, unique
    m = shira_indices(w, 50, "magnitude")
    chosen = torch.zeros(w.numel(), dtype=torch.bool)
    chosen[m] = True
    assert w.flatten().abs()[chosen].min() >= w.flatten().abs()[~chosen].max()


def test_selection_stays_inside_allowed():
    w = _w()
    allowed = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    for idx in (
        shira_indices(w, 60, "random", 0, allowed),
        shira_indices(w, 60, "magnitude", 0, allowed),
        lift_indices(w, 60, 4, allowed),
    ):
        assert idx.numel() == 60 and bool(allowed.flatten()[idx].all())
    with pytest.raises(SparselandError, match="lower the budget"):
        shira_indices(w, int(allowed.sum()) + 1, "random", 0, allowed)


def test_low_rank_approx_is_the_svd_truncation():
    u = torch.randn(24, 3, dtype=torch.float64)
    v = torch.randn(3, 40, dtype=torch.float64)
    w = (u @ v).float()
    assert torch.allclose(low_rank_approx(w, 3), w, atol=1e-4)  # a rank-3 matrix is its own rank-3 approx
    w = _w()
    r2 = low_rank_approx(w, 2)
    sv = torch.linalg.svdvals(r2.double())
    assert sv[1] > 0.1 * sv[0] and sv[2] < 1e-5 * sv[0]  # rank 2 up to float32 rounding
    s = torch.linalg.svdvals(w.double())
    assert torch.isclose(torch.linalg.norm((w - r2).double()), s[2:].norm(), rtol=1e-4)  # Eckart-Young


def test_lift_ranks_by_the_low_rank_approximation_not_by_w():
    w = _w()
    spike = w.clone()
    spike[0, 0] = 100.0  # huge, but a single entry: the rank-1 approximation spreads it over row 0 / col 0
    base = low_rank_approx(spike, 2).abs().flatten()
    idx = lift_indices(spike, 30, 2)
    assert torch.equal(idx, torch.topk(base, 30).indices.sort().values)
    assert not torch.equal(idx, shira_indices(spike, 30, "magnitude"))


def test_s2ft_takes_whole_groups():
    cols = s2ft_columns(64, 24, group=8, seed=1)
    assert cols.numel() == 24
    groups = cols.view(-1, 8)
    assert torch.equal(groups - groups[:, :1], torch.arange(8).expand(3, 8))  # contiguous heads
    assert torch.all(groups[:, 0] % 8 == 0)
    w = torch.zeros(4, 64)
    w[:, 40:48] = 5.0
    assert torch.equal(s2ft_columns(64, 8, group=8, how="norm", weight=w), torch.arange(40, 48))
    with pytest.raises(SparselandError):
        s2ft_columns(64, 80, group=8)


def test_spiel_drops_smallest_delta_and_grows_largest_gradient():
    idx = torch.tensor([0, 3, 5, 7, 9])
    delta = torch.tensor([0.5, -0.01, 0.2, 0.02, -0.9])  # smallest |delta|: positions 3 and 7
    grad = torch.zeros(12)
    grad[idx] = 100.0  # trainable already: must not be "regrown"
    grad[torch.tensor([2, 11, 4])] = torch.tensor([-3.0, 2.0, 0.5])
    new, kept = spiel_update(idx, delta, grad, 2)
    assert torch.equal(new, torch.tensor([0, 2, 5, 9, 11]))  # 3, 7 dropped; 2, 11 grown (|g| largest)
    assert torch.equal(kept, torch.tensor([True, False, True, False, True]))
    allowed = torch.ones(12, dtype=torch.bool)
    allowed[2] = False
    new, _ = spiel_update(idx, delta, grad, 2, allowed)
    assert torch.equal(new, torch.tensor([0, 4, 5, 9, 11]))
    new, kept = spiel_update(idx, delta, grad, 0)
    assert torch.equal(new, idx) and bool(kept.all())
