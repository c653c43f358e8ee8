"""bf16 sparse kernels at every kernel level the CPU has, the to_dense ops, and their input checks.

- Single-vector bitmask and N:M matmuls with bf16 values == the torch references at level 0 (AVX2
  tables), 1 (AVX-512 VPOPCNTDQ) and 2 (AVX-512 VBMI2 vpexpandw), switched in-process with
  ``torch.ops.sparseland.set_bitmask_isa``; a level the CPU lacks is skipped, not compared with itself.
- ``bitmask_to_dense`` / ``nm4_to_dense`` (C++) == the torch references bit for bit (hypothesis over
  shapes, densities and value dtypes), and the formats' ``to_dense()`` == the weight they were built from.
- Malformed layouts raise RuntimeError in the to_dense ops and in ``bitmask_mm`` / ``nm4_mm``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.runtime import kernels
from sparseland.runtime.formats import BitmaskFormat, NMFormat

pytestmark = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")

LEVELS = {0: "avx2", 1: "avx512 vpopcntdq", 2: "avx512 vbmi2"}


def _ops():
    return torch.ops.sparseland


@pytest.fixture(params=sorted(LEVELS), ids=[LEVELS[k] for k in sorted(LEVELS)])
def level(request):
    cpu = _ops().cpu_bitmask_isa()
    if request.param > cpu:
        pytest.skip(f"this CPU has no {LEVELS[request.param]} (kernel level {cpu})")
    old = _ops().set_bitmask_isa(request.param)
    assert _ops().set_bitmask_isa(-1) == request.param
    yield request.param
    _ops().set_bitmask_isa(old)


def _weight(out: int, inp: int, density: float, seed: int, nm: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if nm:  # 2:4: keep the 2 largest of every 4
        grp = w.view(out, -1, 4)
        grp.scatter_(-1, grp.abs().topk(2, dim=-1, largest=False).indices, 0.0)
        return w
    w = w * (torch.rand(out, inp, generator=g) < density)
    if out > 2:
        w[-1] = 0  # an empty last row: loads near the end of the values
        w[0] = torch.randn(inp, generator=g)  # a full row
    return w


# Shapes: the model's, rows with a partial last 32-bit mask word (in % 32 != 0), in8 % 8 tails, tiny rows.
SHAPES = [(64, 576), (33, 1536), (17, 40), (9, 8), (5, 100), (12, 264), (3, 36)]


@pytest.mark.parametrize("out,inp", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.1, 0.9])
def test_bitmask_bf16_matvec_matches_reference(level, out, inp, density):
    w = _weight(out, inp, density, seed=out * inp)
    f = BitmaskFormat.from_dense(w, torch.bfloat16)
    x = torch.randn(1, inp, generator=torch.Generator().manual_seed(1))
    y, ref = f.matmul(x), f.reference(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5)


@pytest.mark.parametrize("out,inp", [s for s in SHAPES if s[1] % 4 == 0])
def test_nm_bf16_matvec_matches_reference(level, out, inp):
    w = _weight(out, inp, 0.5, seed=out + inp, nm=True)
    f = NMFormat.from_dense(w, torch.bfloat16)
    x = torch.randn(1, inp, generator=torch.Generator().manual_seed(2))
    y, ref = f.matmul(x), f.reference(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5)


def test_levels_differ_in_code_not_result():
    """Level 2 (if present) and level 0 agree with each other on a model shape to float rounding."""
    cpu = _ops().cpu_bitmask_isa()
    if cpu < 2:
        pytest.skip("needs AVX-512 VBMI2 to compare level 2 with level 0")
    f = BitmaskFormat.from_dense(_weight(96, 576, 0.5, 3), torch.bfloat16)
    x = torch.randn(1, 576)
    old = _ops().set_bitmask_isa(0)
    try:
        y0 = f.matmul(x)
        _ops().set_bitmask_isa(2)
        y2 = f.matmul(x)
    finally:
        _ops().set_bitmask_isa(old)
    torch.testing.assert_close(y2, y0, rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    inp=st.integers(1, 90),
    density=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bitmask_to_dense_bit_exact(out, inp, density, bf16, seed):
    dt = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)
    f = BitmaskFormat.from_dense(w, dt)
    got = _ops().bitmask_to_dense(f.mask, f.row_ptr, f.values, inp)
    ref = kernels.ref_bitmask_to_dense(f.mask, f.row_ptr, f.values, inp)
    assert got.dtype == torch.float32 and got.shape == (out, inp)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bit for bit (also +0.0 vs -0.0)
    assert torch.equal(f.to_dense(), w.to(dt).float())
    assert f.to_dense(dt).dtype == dt


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    groups=st.integers(1, 25),
    bf16=st.booleans(),
    pattern=st.sampled_from([(2, 4), (4, 8)]),
    seed=st.integers(0, 2**16),
)
def test_nm4_to_dense_bit_exact(out, groups, bf16, pattern, seed):
    n, m = pattern
    dt = torch.bfloat16 if bf16 else torch.float32
    inp = groups * m
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    grp = w.view(out, -1, m)
    grp.scatter_(-1, grp.abs().topk(m - n, dim=-1, largest=False).indices, 0.0)
    f = NMFormat.from_dense(w, dt, n, m)
    got = _ops().nm4_to_dense(f.mask, f.values, inp)
    ref = kernels.ref_nm4_to_dense(f.mask, f.values, inp)
    assert got.dtype == torch.float32 and got.shape == (out, inp)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(f.to_dense(), w.to(dt).float())


def test_to_dense_reference_path_agrees():
    w = _weight(20, 50, 0.4, 7)
    f = BitmaskFormat.from_dense(w, torch.bfloat16)
    fast = f.to_dense()
    with kernels.force_reference():
        slow = f.to_dense()
    assert torch.equal(fast, slow)


# ----- malformed inputs -------------------------------------------------------------------------------


def _bm(out: int = 6, inp: int = 20, dt=torch.float32) -> BitmaskFormat:
    return BitmaskFormat.from_dense(_weight(out, inp, 0.5, 11), dt)


def test_bitmask_to_dense_rejects_malformed():
    f = _bm()
    op = _ops().bitmask_to_dense
    rp = f.row_ptr.clone()
    rp[2], rp[3] = rp[3], rp[2]  # not monotone (if the rows differ) -> make sure they do
    if rp[2] == rp[3]:
        rp[2] += 1
    with pytest.raises(RuntimeError, match="non-decreasing|set bits"):
        op(f.mask, rp, f.values, 20)
    with pytest.raises(RuntimeError, match="padding"):  # row_ptr[out] + 8 > values.numel()
        op(f.mask, f.row_ptr, f.values[:-1], 20)
    bad = f.mask.clone()
    bad[1, 0] ^= 1  # one bit more or less than row_ptr says
    with pytest.raises(RuntimeError, match="set bits"):
        op(bad, f.row_ptr, f.values, 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(f.mask, f.row_ptr, torch.stack([f.values, f.values], 1)[:, 0], 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(f.mask, torch.stack([f.row_ptr, f.row_ptr], 1)[:, 0], f.values, 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(f.mask.t().contiguous().t(), f.row_ptr, f.values, 20)
    with pytest.raises(RuntimeError, match="in_features"):
        op(f.mask, f.row_ptr, f.values, 30)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(f.mask, f.row_ptr, f.values.double(), 20)
    rp = f.row_ptr.clone()
    rp[0] = -1
    with pytest.raises(RuntimeError, match=">= 0"):
        op(f.mask, rp, f.values, 20)


def test_bitmask_to_dense_rejects_bits_past_in_features():
    f = _bm(inp=20)  # 3 mask bytes, 4 columns of the last one used
    m = f.mask.clone()
    m[0, 2] |= 0x80  # column 23 does not exist
    rp = f.row_ptr.clone()
    rp[1:] += 1
    vals = torch.cat([f.values, f.values.new_zeros(1)])
    with pytest.raises(RuntimeError, match="past in_features"):
        _ops().bitmask_to_dense(m, rp, vals, 20)


def test_nm4_to_dense_rejects_malformed():
    f = NMFormat.from_dense(_weight(5, 16, 0.5, 3, nm=True), torch.float32)
    op = _ops().nm4_to_dense
    bad = f.mask.clone()
    bad[2, 1] = 0b00000111  # 3 bits set
    with pytest.raises(RuntimeError, match="4 bits set"):
        op(bad, f.values, 16)
    with pytest.raises(RuntimeError, match="padding"):
        op(f.mask, f.values[:-1], 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(f.mask, torch.stack([f.values, f.values], 1)[:, 0], 16)
    with pytest.raises(RuntimeError, match="in_features"):
        op(f.mask, f.values, 8)


def test_matmuls_reject_non_contiguous_and_bad_row_ptr():
    f = _bm(dt=torch.bfloat16)
    x = torch.randn(1, 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().bitmask_mm(f.mask, f.row_ptr, torch.stack([f.values, f.values], 1)[:, 0], x)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().bitmask_mm(f.mask, torch.stack([f.row_ptr, f.row_ptr], 1)[:, 0], f.values, x)
    rp = f.row_ptr.clone()
    rp[3] = rp[4] + 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        _ops().bitmask_mm(f.mask, rp, f.values, x)
    with pytest.raises(RuntimeError, match="padding"):
        _ops().bitmask_mm(f.mask, f.row_ptr, f.values[:-1], x)
    n = NMFormat.from_dense(_weight(5, 16, 0.5, 3, nm=True), torch.bfloat16)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().nm4_mm(n.mask, torch.stack([n.values, n.values], 1)[:, 0], torch.randn(1, 16))
