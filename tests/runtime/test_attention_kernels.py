"""Sparse attention kernels == their PyTorch references; at full density both == dense causal SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.runtime import attention as A
from sparseland.runtime import kernels

needs_kernels = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")


def _qkv(H: int, KVH: int, T: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, T, D, generator=g) for n in (H, KVH, KVH))


def _sdpa(q, k, v):
    G = q.shape[0] // k.shape[0]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 0), v.repeat_interleave(G, 0), is_causal=True)


def _with_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


pytestmark = pytest.mark.usefixtures("one_thread")


heads = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (9, 3)])


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    hk=heads,
    T=st.integers(1, 200),
    D=st.sampled_from([32, 64, 128, 8, 13]),
    block_size=st.sampled_from([16, 32, 64, 20]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_block_sparse_matches_reference(hk, T, D, block_size, density, threads, seed):
    H, KVH = hk
    q, k, v = _qkv(H, KVH, T, D, seed)
    nb = math.ceil(T / block_size)
    mask = torch.rand(H, nb, nb, generator=torch.Generator().manual_seed(seed + 1)) < density
    got = _with_threads(threads, lambda: A.block_sparse_attention(q, k, v, mask, block_size))
    ref = A.block_sparse_attention_reference(q, k, v, mask, block_size)
    assert got.shape == (H, T, D) and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(hk=heads, T=st.integers(1, 150), D=st.sampled_from([32, 64]), seed=st.integers(0, 10_000))
def test_full_density_equals_dense_causal(hk, T, D, seed):
    H, KVH = hk
    q, k, v = _qkv(H, KVH, T, D, seed)
    mask = A.dense_block_mask(H, T, 32)
    assert A.block_density(mask, T, 32) == pytest.approx(1.0)
    dense = _sdpa(q, k, v)
    torch.testing.assert_close(A.block_sparse_attention_reference(q, k, v, mask, 32), dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(A.block_sparse_attention(q, k, v, mask, 32), dense, atol=2e-5, rtol=1e-4)


def test_mask_above_diagonal_is_ignored_and_diagonal_forced():
    H, T, bs = 2, 96, 32
    q, k, v = _qkv(H, 1, T, 32, 0)
    empty = torch.zeros(H, 3, 3, dtype=torch.bool)
    full_upper = torch.ones(H, 3, 3, dtype=torch.bool).triu(1)  # only non-causal blocks: same as empty
    a = A.block_sparse_attention(q, k, v, empty, bs)
    torch.testing.assert_close(a, A.block_sparse_attention(q, k, v, full_upper, bs))
    # Diagonal blocks only == causal attention inside each block, computed block by block.
    for i in range(3):
        s = slice(i * bs, (i + 1) * bs)
        torch.testing.assert_close(a[:, s], _sdpa(q[:, s], k[:, s], v[:, s]), atol=2e-5, rtol=1e-4)
    assert torch.isfinite(a).all()
    assert A.block_density(empty, T, bs) == pytest.approx(3 * (32 * 33 / 2) / (T * (T + 1) / 2))


def test_sink_only_rows_attend_sink_block():
    """Query block 2 keeps only key block 0 (plus its diagonal): the middle block must not matter."""
    H, T, bs = 1, 48, 16
    q, k, v = _qkv(H, 1, T, 32, 3)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 2, 0] = True
    out = A.block_sparse_attention(q, k, v, mask, bs)
    k2, v2 = k.clone(), v.clone()
    k2[:, 16:32] += 5.0
    v2[:, 16:32] -= 3.0  # change key block 1
    torch.testing.assert_close(out[:, 32:], A.block_sparse_attention(q, k2, v2, mask, bs)[:, 32:])
    keep = torch.cat([torch.arange(16), torch.arange(32, 48)])
    s = (q[0, 32:] @ k[0, keep].T) / math.sqrt(32)
    s[:, 16:] = s[:, 16:].masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out[0, 32:], torch.softmax(s, -1) @ v[0, keep], atol=2e-5, rtol=1e-4)


def test_block_density_counts_pairs():
    T, bs = 100, 32  # blocks of 32, 32, 32, 4
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3, 0] = True
    diag = 3 * 32 * 33 / 2 + 4 * 5 / 2
    assert A.block_density(mask, T, bs) == pytest.approx((diag + 4 * 32) / (T * 101 / 2))
    with pytest.raises(SparselandError, match="block_mask must be"):
        A.block_density(mask, 200, bs)


@settings(max_examples=30, deadline=None)
@given(
    hk=heads,
    S=st.integers(1, 700),
    D=st.sampled_from([32, 64, 128, 13]),
    frac=st.sampled_from([0.05, 0.3, 1.0]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_sparse_decode_matches_reference(hk, S, D, frac, threads, seed):
    H, KVH = hk
    g = torch.Generator().manual_seed(seed)
    q, kc, vc = torch.randn(H, D, generator=g), torch.randn(KVH, S, D, generator=g), torch.randn(KVH, S, D, generator=g)
    K = max(1, int(frac * S))
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(H)])
    got = _with_threads(threads, lambda: A.sparse_decode_attention(q, kc, vc, idx))
    ref = A.sparse_decode_attention_reference(q, kc, vc, idx)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # Order of the indices is irrelevant.
    perm = idx[:, torch.randperm(K, generator=g)]
    torch.testing.assert_close(A.sparse_decode_attention(q, kc, vc, perm), got, atol=2e-6, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(hk=heads, S=st.integers(1, 600), D=st.sampled_from([32, 64]), seed=st.integers(0, 10_000))
def test_all_indices_equal_dense_decode(hk, S, D, seed):
    H, KVH = hk
    g = torch.Generator().manual_seed(seed)
    q, kc, vc = torch.randn(H, D, generator=g), torch.randn(KVH, S, D, generator=g), torch.randn(KVH, S, D, generator=g)
    dense = A.dense_decode_attention(q, kc, vc)
    torch.testing.assert_close(dense, A.dense_decode_attention_reference(q, kc, vc), atol=2e-5, rtol=1e-4)
    idx = torch.arange(S).flip(0).expand(H, S).contiguous()
    torch.testing.assert_close(A.sparse_decode_attention(q, kc, vc, idx), dense, atol=2e-5, rtol=1e-4)
    G = H // KVH
    sdpa = F.scaled_dot_product_attention(q[:, None], kc.repeat_interleave(G, 0), vc.repeat_interleave(G, 0))[:, 0]
    torch.testing.assert_close(dense, sdpa, atol=2e-5, rtol=1e-4)


def test_decode_accepts_a_sliced_cache():
    """A preallocated cache sliced to its first S positions (row-strided heads) gives the same result."""
    q = torch.randn(4, 64)
    big_k, big_v = torch.randn(2, 300, 64), torch.randn(2, 300, 64)
    kc, vc = big_k[:, :200], big_v[:, :200]
    assert not kc.is_contiguous()
    idx = torch.stack([torch.randperm(200)[:50] for _ in range(4)])
    dense = A.dense_decode_attention(q, kc.contiguous(), vc.contiguous())
    torch.testing.assert_close(A.dense_decode_attention(q, kc, vc), dense)
    sparse = A.sparse_decode_attention(q, kc.contiguous(), vc.contiguous(), idx)
    torch.testing.assert_close(A.sparse_decode_attention(q, kc, vc, idx), sparse)
    torch.testing.assert_close(sparse, A.sparse_decode_attention_reference(q, kc, vc, idx), atol=2e-5, rtol=1e-4)


def test_force_reference_switch():
    q, k, v = _qkv(2, 1, 40, 32, 5)
    mask = torch.rand(2, 2, 2) < 0.5
    with kernels.force_reference():
        assert not kernels.use_kernels()
        ref = A.block_sparse_attention(q, k, v, mask, 32)
    torch.testing.assert_close(ref, A.block_sparse_attention_reference(q, k, v, mask, 32), atol=0, rtol=0)


@pytest.mark.parametrize("reference", [False, True])
def test_bad_input_is_a_clear_error(reference):
    q, k, v = _qkv(4, 2, 64, 32, 0)
    mask = A.dense_block_mask(4, 64, 32)
    bsa = A.block_sparse_attention_reference if reference else A.block_sparse_attention
    with pytest.raises(SparselandError, match="float32"):
        bsa(q.double(), k, v, mask, 32)
    with pytest.raises(SparselandError, match="multiple of the KV heads"):
        bsa(q[:3], k, v, mask[:3], 32)
    with pytest.raises(SparselandError, match=r"block_mask must be bool \(H, nb, nb\) = \(4, 4, 4\) for T=64"):
        bsa(q, k, v, mask, 16)
    with pytest.raises(SparselandError, match="block_mask must be bool"):
        bsa(q, k, v, mask.int(), 32)
    with pytest.raises(SparselandError, match="must have q's T"):
        bsa(q, k[:, :10], v[:, :10], mask, 32)
    with pytest.raises(SparselandError, match="block_size must be a positive"):
        bsa(q, k, v, mask, 0)
    dec = A.sparse_decode_attention_reference if reference else A.sparse_decode_attention
    qd, kc = torch.randn(4, 32), torch.randn(2, 50, 32)
    with pytest.raises(SparselandError, match=r"indices must lie in \[0, S=50\)"):
        dec(qd, kc, kc, torch.full((4, 3), 50))
    with pytest.raises(SparselandError, match="indices must be int64"):
        dec(qd, kc, kc, torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(SparselandError, match="indices must be int64"):
        dec(qd, kc, kc, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(SparselandError, match=r"expected q \(H, D\)"):
        dec(qd, kc[..., :16], kc[..., :16], torch.zeros(4, 3, dtype=torch.int64))
