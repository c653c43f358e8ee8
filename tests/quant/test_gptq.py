"""GPTQ and SparseGPT's joint prune + quantize on tiny random layers: lower layer-output error than
round-to-nearest, exact masks and codes, the format contract, and ``quant=None`` unchanged."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.quant.gptq import _gptq, gptq_quantize
from sparseland.quant.scheme import QuantScheme, quantize_rtn
from sparseland.weights import is_nm, magnitude_scores, unstructured_mask
from sparseland.weights.sparsegpt import _hinv_upper, sparsegpt_prune, sparsegpt_prune_quantize


def layer(seed=0, out_f=32, in_f=128, tokens=512):
    """A weight and inputs like real activations: correlated channels (mostly low rank), log-normal
    channel scales, nonzero channel means."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    scales = torch.exp(torch.randn(in_f, generator=g))
    Z = torch.randn(tokens, in_f // 4, generator=g) @ torch.randn(in_f // 4, in_f, generator=g)
    X = (Z + 0.3 * torch.randn(tokens, in_f, generator=g) + 0.3 * torch.randn(in_f, generator=g)) * scales
    return W, X


def out_err(W, Q, X):
    """||X W^T - X Q^T||^2, the layer-output error on the calibration inputs."""
    return float(((W - Q) @ X.T).pow(2).sum())


SEEDS = range(4)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "int4-g64-sym", "int8"])
def test_gptq_beats_rtn(scheme):
    ratios = []
    for seed in SEEDS:
        W, X = layer(seed)
        qw = gptq_quantize(W, X.T @ X, scheme)
        ratios.append(out_err(W, qw.dequantize(), X) / out_err(W, quantize_rtn(W, scheme).dequantize(), X))
    assert sum(ratios) / len(ratios) < 0.7, ratios


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64-sym", "int8"])
def test_gptq_diagonal_hessian_is_rtn(scheme):
    # Uncorrelated inputs: no error to spread, so GPTQ is round-to-nearest, code for code and scale for scale.
    W, X = layer(5)
    H = torch.diag(X.pow(2).sum(0))
    qw, rtn = gptq_quantize(W, H, scheme), quantize_rtn(W, scheme)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale)
    assert (qw.offset is None) == (rtn.offset is None)
    assert qw.offset is None or torch.equal(qw.offset, rtn.offset)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "int4-g128"])
def test_gptq_blocksize_only_batches_the_updates(scheme):
    # Lazy block updates are exact: groups that start mid-block or span several blocks see the same current
    # weights, so the result hardly depends on the blocksize (only float rounding differs).
    W, X = layer(6)
    H = X.T @ X
    ref = gptq_quantize(W, H, scheme, blocksize=128)
    e_ref = out_err(W, ref.dequantize(), X)
    for bs in (16, 48, 64):
        qw = gptq_quantize(W, H, scheme, blocksize=bs)
        assert float((qw.codes == ref.codes).float().mean()) > 0.99
        assert abs(out_err(W, qw.dequantize(), X) - e_ref) < 0.02 * e_ref


def test_gptq_act_order():
    W, X = layer(7)
    H = X.T @ X
    qw, Wq = _gptq(W, H, "int4-g32", act_order=True)
    assert torch.equal(qw.dequantize(), Wq)
    assert out_err(W, Wq, X) < 0.7 * out_err(W, quantize_rtn(W, "int4-g32").dequantize(), X)


@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4)])
@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64-sym"])
def test_gptq_on_a_pruned_weight(n, m, scheme):
    ratios = []
    for seed in SEEDS:
        W, X = layer(seed)
        H = X.T @ X
        Wp = sparsegpt_prune(W, H, 0.5, n, m)
        mask = Wp != 0
        qw, Wq = _gptq(Wp, H, scheme, mask=mask)
        assert torch.equal(qw.mask, mask)
        assert torch.equal(qw.dequantize(), Wq)
        assert (Wq[~mask] == 0).all() and not torch.signbit(Wq[~mask]).any()  # exactly +0.0
        assert (qw.codes[~mask] == 0).all()
        assert int(qw.codes.max()) <= qw.scheme.qmax
        ratios.append(out_err(Wp, Wq, X) / out_err(Wp, quantize_rtn(Wp, scheme, mask).dequantize(), X))
    assert sum(ratios) / len(ratios) < 0.7, ratios


def test_gptq_mask_diagonal_hessian_is_masked_rtn():
    # Pruned entries take no part in their group's scale: equal to the masked round-to-nearest. A random mask
    # prunes some group extremes, so counting them would change the scales.
    W, X = layer(8)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    qw = gptq_quantize(W, torch.diag(X.pow(2).sum(0)), "int4-g32", mask=mask)
    rtn = quantize_rtn(W, "int4-g32", mask)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale) and torch.equal(qw.offset, rtn.offset)
    assert not torch.equal(rtn.scale, quantize_rtn(W, "int4-g32").scale)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scheme=st.sampled_from(["int4-g32", "int4-g64", "int4-g32-sym", "int8", "int8-g32"]),
    blocksize=st.sampled_from([16, 32, 128]),
    sparse=st.booleans(),
)
def test_gptq_format_contract(seed, scheme, blocksize, sparse):
    W, X = layer(seed, out_f=8, in_f=64, tokens=96)
    X[:, 3] = 0  # a dead input
    mask = unstructured_mask(magnitude_scores(W), 0.5) if sparse else None
    qw, Wq = _gptq(W, X.T @ X, scheme, blocksize=blocksize, mask=mask)
    s = QuantScheme.parse(scheme)
    g = s.group_size(64)
    assert qw.codes.shape == (8, 64) and qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= s.qmax
    assert qw.scale.shape == (8, 64 // g) and qw.scale.dtype == torch.float16
    assert (qw.offset is None) == s.symmetric
    assert torch.equal(qw.dequantize(), Wq)
    assert torch.isfinite(Wq).all()
    if sparse:
        assert (Wq[~mask] == 0).all() and (qw.codes[~mask] == 0).all() and (Wq[mask] != 0).float().mean() > 0.5


def test_gptq_checks_shapes():
    W, X = layer(0, in_f=64)
    with pytest.raises(SparselandError):
        gptq_quantize(W, torch.eye(32), "int4-g32")
    with pytest.raises(SparselandError):
        gptq_quantize(W, X.T @ X, "int4-g32", mask=torch.ones(3, 64, dtype=torch.bool))
    with pytest.raises(SparselandError):
        gptq_quantize(W[:, :48], torch.eye(48), "int4-g32")  # 48 columns: not a multiple of 32


# --- SparseGPT joint prune + quantize --------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4)])
@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64"])
def test_joint_beats_sequential_and_magnitude(n, m, scheme):
    joint, seq, mag = [], [], []
    for seed in SEEDS:
        W, X = layer(seed)
        H = X.T @ X
        qw = sparsegpt_prune_quantize(W, H, 0.5, scheme, n, m)
        Wp = sparsegpt_prune(W, H, 0.5, n, m)
        mmask = unstructured_mask(magnitude_scores(W), 0.5)
        if n:
            from sparseland.weights import nm_mask

            mmask = nm_mask(magnitude_scores(W), n, m)
        joint.append(out_err(W, qw.dequantize(), X))
        seq.append(out_err(W, quantize_rtn(Wp, scheme, Wp != 0).dequantize(), X))
        mag.append(out_err(W, quantize_rtn(W, scheme, mmask).dequantize(), X))
    assert sum(joint) < 0.95 * sum(seq) < 0.95 * sum(mag), (joint, seq, mag)


def test_joint_masks_are_exact():
    W, X = layer(9, in_f=128)
    H = X.T @ X
    qw = sparsegpt_prune_quantize(W, H, 0.6, "int4-g32", blocksize=64)
    for i in range(0, 128, 64):
        assert int((~qw.mask[:, i : i + 64]).sum()) == int(W.shape[0] * 64 * 0.6)
    for n, m in [(2, 4), (4, 8), (1, 4)]:
        qw = sparsegpt_prune_quantize(W, H, 1 - n / m, "int4-g32", n, m, blocksize=64)
        assert (qw.mask.reshape(W.shape[0], -1, m).sum(-1) == n).all()
        assert is_nm(qw.dequantize(), n, m)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scheme=st.sampled_from(["int4-g32", "int4-g64-sym", "int8-g32", "int4-g32-sym"]),
    nm=st.sampled_from([(0, 0), (2, 4), (4, 8)]),
)
def test_joint_format_contract(seed, scheme, nm):
    W, X = layer(seed, out_f=8, in_f=128, tokens=160)
    X[:, 5] = 0  # a dead input
    n, m = nm
    H = X.T @ X
    qw = sparsegpt_prune_quantize(W, H, 0.5, scheme, n, m, blocksize=64)
    Wq = sparsegpt_prune(W, H, 0.5, n, m, blocksize=64, quant=scheme)
    assert torch.equal(qw.dequantize(), Wq)
    assert (Wq[~qw.mask] == 0).all() and not torch.signbit(Wq[~qw.mask]).any()
    assert (qw.codes[~qw.mask] == 0).all() and int(qw.codes.max()) <= qw.scheme.qmax
    assert abs(qw.density() - 0.5) < 1e-9


def test_joint_diagonal_hessian_equal_inputs_prunes_by_magnitude_per_block():
    W, X = layer(10)
    qw = sparsegpt_prune_quantize(W, torch.eye(128) * 7.0, 0.5, "int4-g32", blocksize=64)
    for i in range(0, 128, 64):
        blk = W[:, i : i + 64].abs().flatten()  # SparseGPT chooses over the whole block, not per row
        keep = torch.ones_like(blk, dtype=torch.bool)
        keep[torch.sort(blk, stable=True).indices[: blk.numel() // 2]] = False
        assert torch.equal(qw.mask[:, i : i + 64], keep.reshape(-1, 64))


@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4)])
def test_joint_diagonal_hessian_is_masked_rtn(n, m):
    # Uncorrelated inputs: nothing is compensated, so each group's grid comes from its kept entries alone --
    # the masked round-to-nearest. Unequal input scales make the mask prune some group extremes.
    W, X = layer(10)
    qw = sparsegpt_prune_quantize(W, torch.diag(X.pow(2).sum(0)), 0.5, "int4-g32", n, m, blocksize=64)
    rtn = quantize_rtn(W, "int4-g32", qw.mask)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale) and torch.equal(qw.offset, rtn.offset)
    assert not torch.equal(rtn.scale, quantize_rtn(W, "int4-g32").scale)


def test_joint_needs_groups_inside_blocks():
    W, X = layer(0)
    with pytest.raises(SparselandError, match="divide blocksize"):
        sparsegpt_prune_quantize(W, X.T @ X, 0.5, "int4-g64", blocksize=32)
    with pytest.raises(SparselandError, match="divide blocksize"):
        sparsegpt_prune_quantize(W, X.T @ X, 0.5, "int8", blocksize=32)  # per-row group
    sparsegpt_prune_quantize(W, X.T @ X, 0.5, "int8", blocksize=128)  # one block: any group


# --- quant=None is the unchanged SparseGPT -----------------------------------------------------------


@torch.no_grad()
def _original_sparsegpt_prune(W, H, sparsity, n=0, m=0, blocksize=128, percdamp=0.01):
    """sparseland.weights.sparsegpt.sparsegpt_prune as it was before ``quant`` was added (verbatim loop)."""
    out_f, in_f = W.shape
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _hinv_upper(H, percdamp)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if n == 0:
            sal = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            k = int(sal.numel() * sparsity)
            mask1 = torch.zeros(sal.numel(), dtype=torch.bool)
            if k:
                mask1[torch.sort(sal, stable=True).indices[:k]] = True
            mask1 = mask1.reshape(out_f, count)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if n and i % m == 0:
                sal = W1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                drop = torch.topk(sal, m - n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize(
    ("sparsity", "n", "m", "blocksize"), [(0.5, 0, 0, 128), (0.6, 0, 0, 48), (0.5, 2, 4, 32), (0.75, 1, 4, 128)]
)
def test_quant_none_is_bit_identical(sparsity, n, m, blocksize):
    W, X = layer(11, in_f=96)
    X[:, 7] = 0
    H = X.T @ X
    got = sparsegpt_prune(W, H, sparsity, n, m, blocksize)
    assert torch.equal(got, _original_sparsegpt_prune(W, H, sparsity, n, m, blocksize))
    assert torch.equal(got, sparsegpt_prune(W, H, sparsity, n, m, blocksize, quant=None))
    assert torch.equal(torch.signbit(got), torch.signbit(_original_sparsegpt_prune(W, H, sparsity, n, m, blocksize)))
