"""SparseGPT, DSnoT and OWL on single layers: reconstruction-error ordering, never-worse refinement,
allocation averaging to the target."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.weights import (
    dsnot_refine,
    is_nm,
    magnitude_scores,
    nm_mask,
    outlier_ratio,
    owl_allocation,
    reconstruction_error,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)


def layer(seed=0, out_f=48, in_f=64, tokens=1024):
    """A weight and inputs like real activations: correlated channels (mostly low rank), log-normal
    channel scales, nonzero channel means."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    scales = torch.exp(torch.randn(in_f, generator=g))  # (in,)
    Z = torch.randn(tokens, in_f // 4, generator=g) @ torch.randn(in_f // 4, in_f, generator=g)  # (T, in) rank in/4
    X = (Z + 0.3 * torch.randn(tokens, in_f, generator=g) + 0.3 * torch.randn(in_f, generator=g)) * scales
    return W, X


def err(W, Wp, X):
    return float(torch.linalg.norm((W - Wp) @ X.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_order_sparsegpt_wanda_magnitude(seed):
    W, X = layer(seed)
    H = X.T @ X
    mag = W * unstructured_mask(magnitude_scores(W), 0.5)
    wan = W * unstructured_mask(wanda_scores(W, X.norm(dim=0)), 0.5)
    sgpt = sparsegpt_prune(W, H, 0.5)
    e_mag, e_wan, e_sgpt = err(W, mag, X), err(W, wan, X), err(W, sgpt, X)
    assert e_sgpt < e_wan < e_mag
    assert abs(float((sgpt == 0).float().mean()) - 0.5) < 1e-6


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm(n, m):
    W, X = layer(3)
    Wp = sparsegpt_prune(W, X.T @ X, 1 - n / m, n, m, blocksize=32)
    assert is_nm(Wp, n, m)
    assert ((Wp.reshape(W.shape[0], -1, m) != 0).sum(-1) == n).all()
    wanda = W * nm_mask(wanda_scores(W, X.norm(dim=0)), n, m)
    assert err(W, Wp, X) < err(W, wanda, X)


def test_sparsegpt_exact_per_block_sparsity():
    W, X = layer(4, in_f=96)
    Wp = sparsegpt_prune(W, X.T @ X, 0.6, blocksize=32)
    for i in range(0, 96, 32):
        assert int((Wp[:, i : i + 32] == 0).sum()) == int(W.shape[0] * 32 * 0.6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sparsity=st.sampled_from([0.3, 0.5, 0.7]),
    init=st.sampled_from(["mag", "wanda"]),
)
def test_dsnot_never_raises_error_and_keeps_row_sparsity(seed, sparsity, init):
    W, X = layer(seed, out_f=24, in_f=32, tokens=256)
    H = X.T @ X
    scores = magnitude_scores(W) if init == "mag" else wanda_scores(W, X.norm(dim=0))
    W0 = W * unstructured_mask(scores, sparsity)
    W1 = dsnot_refine(W, W0, H, X.mean(0), X.var(0, unbiased=False), max_cycles=30)
    before, after = reconstruction_error(W, W0, H), reconstruction_error(W, W1, H)
    assert (after <= before * (1 + 1e-9) + 1e-9).all()
    assert torch.equal((W1 == 0).sum(1), (W0 == 0).sum(1))
    kept = W1 != 0
    assert torch.equal(W1[kept], W[kept])  # grown weights take their dense value


def test_dsnot_improves_magnitude_mask():
    W, X = layer(7)
    H = X.T @ X
    W0 = W * unstructured_mask(magnitude_scores(W), 0.6)
    W1 = dsnot_refine(W, W0, H, X.mean(0), X.var(0, unbiased=False))
    assert reconstruction_error(W, W1, H).sum() < 0.95 * reconstruction_error(W, W0, H).sum()


def test_dsnot_keeps_nm_and_sparsegpt_weights():
    W, X = layer(8)
    H = X.T @ X
    W0 = sparsegpt_prune(W, H, 0.5, 2, 4)
    W1 = dsnot_refine(W, W0, H, X.mean(0), X.var(0, unbiased=False), nm=(2, 4))
    assert is_nm(W1, 2, 4)
    assert (reconstruction_error(W, W1, H) <= reconstruction_error(W, W0, H) * (1 + 1e-9)).all()


def test_dsnot_deterministic():
    W, X = layer(9)
    H = X.T @ X
    W0 = W * unstructured_mask(magnitude_scores(W), 0.5)
    a = dsnot_refine(W, W0, H, X.mean(0), X.var(0))
    b = dsnot_refine(W, W0, H, X.mean(0), X.var(0))
    assert torch.equal(a, b)


@settings(max_examples=50, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 0.2, allow_nan=False), min_size=1, max_size=40),
    target=st.floats(0.1, 0.85),
    lam=st.floats(0, 0.1),
)
def test_owl_allocation_averages_to_target(ratios, target, lam):
    # A layer can sit up to 2*lam from the target; outside [0, 1) OWL refuses (tested below).
    assume(2 * lam <= target < 1 - 2 * lam)
    s = owl_allocation(ratios, target, lam)
    assert len(s) == len(ratios)
    assert math.isclose(sum(s) / len(s), target, abs_tol=1e-9)
    assert all(target - 2 * lam - 1e-9 <= x <= target + 2 * lam + 1e-9 for x in s)
    assert max(s) - min(s) <= 2 * lam + 1e-9


def test_owl_allocation_out_of_range_is_a_clear_error():
    with pytest.raises(SparselandError, match="owl_lambda"):
        owl_allocation([0.0, 0.0, 0.125], 0.109375, 0.09375)


def test_owl_more_outliers_less_sparsity():
    s = owl_allocation([0.01, 0.05, 0.02], 0.7, 0.08)
    assert s[1] < s[2] < s[0]
    assert math.isclose(s[0] - s[1], 0.16)


def test_outlier_ratio():
    scores = [torch.ones(99), torch.tensor([1000.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.01)


def test_hinv_upper_in_place_equals_textbook_and_keeps_input():
    """The in-place inverse-Hessian factor (two (in, in) buffers) is bit-identical to the plain formula,
    and the copying variant leaves its argument untouched."""
    from sparseland.weights.sparsegpt import _hinv_upper, _hinv_upper_

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    H = x.T @ x
    before = H.clone()
    damped = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(48)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(_hinv_upper(H, 0.01), expected)
    assert torch.equal(H, before)
    assert torch.equal(_hinv_upper_(H.clone(), 0.01), expected)


def test_input_stats_add_equals_float64_copies():
    """InputStats adds float32 terms into its float64 sums, exactly as converting each term first."""
    from sparseland.weights.pruner import InputStats

    st = InputStats(24, gram=True)
    gram = torch.zeros(24, 24, dtype=torch.float64)
    sumsq = torch.zeros(24, dtype=torch.float64)
    for seed in range(3):
        x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(seed))
        st.add(x)
        x2 = x.reshape(-1, 24)
        gram += (x2.T @ x2).double()
        sumsq += (x2 * x2).sum(0).double()
    assert torch.equal(st.gram, gram) and torch.equal(st.sumsq, sumsq) and st.n == 42
