"""Sparse + 4-bit formats (q4_nm, q4_bitmask): layout round trips, exact dequantization, and the C++
kernels (AVX-512 and forced AVX2) against the float reference and the kernels' own x quantization."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantScheme, quantize_rtn
from sparseland.runtime import kernels
from sparseland.runtime import qsparse as qs

needs_kernels = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")


def _pruned(out, inp, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


def _nm_pruned(out, inp, n, m, seed, deficient=False):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    g = w.view(out, -1, m)
    g.scatter_(-1, g.abs().topk(m - n, dim=-1, largest=False).indices, 0.0)
    if deficient:  # some groups keep fewer than n
        w[::3, : 2 * m] = 0.0
    return w


def _scheme(group, sym):
    return QuantScheme(4, group, sym)


def _isas():
    if not kernels.extension_available():
        return []
    return ["avx2", "avx512"] if torch.ops.sparseland.qsparse_isa() == "avx512" or _has_avx512() else ["avx2"]


def _has_avx512():
    try:
        prev = torch.ops.sparseland.qsparse_set_isa("avx512")
        torch.ops.sparseland.qsparse_set_isa(prev)
        return True
    except RuntimeError:
        return False


def _run(fmt, x, isa, threads):
    old_t = torch.get_num_threads()
    prev = torch.ops.sparseland.qsparse_set_isa(isa)
    torch.set_num_threads(threads)
    try:
        return fmt.matmul(x)
    finally:
        torch.set_num_threads(old_t)
        torch.ops.sparseland.qsparse_set_isa(prev)


def _check_against_refs(fmt, x, got):
    """Tight: the kernels' arithmetic in float64 (only float32 summation order differs, relative to the
    magnitude of the terms summed). Loose: the float product, within the x quantization error bound
    sum_c |W[r,c]| s_b / 2."""
    w = fmt.to_dense()  # (out, in) float32
    out, n = w.shape
    keep = qs._unpack_mask(fmt.mask)[:, :n]
    codes = _codes_of(fmt)
    d = fmt.scale.float()
    m = fmt.offset.float() if fmt.offset is not None else d * -8.0
    tight = qs.ref_q8_mm(codes, keep, d, m, x)  # (B, out) float64
    xq, s = qs.quantize_x_q8(x)
    g = fmt.group
    dl = d.repeat_interleave(g, 1).double()
    ml = m.repeat_interleave(g, 1).double()
    sl = s.repeat_interleave(32, 1).double()  # (B, in)
    mag = (xq.double().abs() * sl) @ (dl.abs() * codes.double() + ml.abs() * keep.double()).T  # (B, out)
    if fmt.offset is None:  # the AVX2 fill kernels sum 8 d xq over every column, pruned ones too
        mag = mag + (xq.double().abs() * sl) @ (8.0 * dl.abs()).T
    assert torch.all((got.double() - tight).abs() <= 2e-6 * mag + 1e-6), (got.double() - tight).abs().max()
    exact = x.double() @ w.double().T
    err_bound = (sl / 2) @ w.double().abs().T  # sum_c |W| s_b / 2
    assert torch.all((got.double() - exact).abs() <= err_bound * 1.001 + 2e-6 * mag + 1e-5)


def _codes_of(fmt):
    n = fmt.in_features
    if isinstance(fmt, qs.Q4NMFormat):
        kept = qs.unpack_codes(fmt.codes, torch.full((fmt.shape[0],), n // 2))
    else:
        kept = qs.unpack_codes(fmt.codes, qs._unpack_mask(fmt.mask).sum(1))
    return qs._dense_codes(fmt.mask, kept, n)


# ----- layout ----------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(counts, seed):
    c = torch.tensor(counts)
    kept = torch.randint(0, 16, (int(c.sum()),), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed, row_ptr = qs.pack_codes(kept, c)
    assert row_ptr[-1] == packed.numel() == int(((c + 1) // 2).sum())
    assert torch.equal(qs.unpack_codes(packed, c), kept)


def test_chunked_nibble_layout_by_hand():
    # 70 codes: a full chunk of 64 (byte i = code i | code i+32 << 4), then 6 codes in 3 bytes (i | i+3)
    kept = torch.arange(70, dtype=torch.uint8) % 16
    packed, _ = qs.pack_codes(kept, torch.tensor([70]))
    assert packed.numel() == 35
    assert packed[0] == (0 | (32 % 16) << 4) and packed[5] == (5 | (37 % 16) << 4)
    assert packed[32] == (64 % 16) | ((67 % 16) << 4) and packed[34] == (66 % 16) | ((69 % 16) << 4)


# ----- formats: exact dequantization and sizes --------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_bitmask_to_dense_is_exact(group, sym):
    w = _pruned(19, 2 * group + 128, 0.4, group + sym)
    qw = quantize_rtn(w, _scheme(group, sym), mask=w != 0)
    f = qs.Q4BitmaskFormat.from_quantized(qw)
    assert torch.equal(f.to_dense(), qw.dequantize())
    assert torch.equal(qs.Q4BitmaskFormat.from_dense(w, _scheme(group, sym)).to_dense(), qw.dequantize())
    stored = [f.mask, f.row_ptr, f.codes, f.scale] + ([f.offset] if f.offset is not None else [])
    assert f.nbytes() == sum(t.numel() * t.element_size() for t in stored)
    code_bytes = int((((w != 0).sum(1) + 1) // 2).sum())  # ceil(nnz / 2) per row, no padding
    per_group = 2 if sym else 4  # fp16 scale (+ offset)
    assert f.nbytes() == 19 * (w.shape[1] // 8) + 8 * 20 + code_bytes + per_group * 19 * (w.shape[1] // group)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_nm_to_dense_is_exact(nm, sym, group):
    n, m = nm
    w = _nm_pruned(13, 3 * 128, n, m, seed=group)
    qw = quantize_rtn(w, _scheme(group, sym), mask=w != 0)
    f = qs.Q4NMFormat.from_quantized(qw, n, m)
    assert torch.equal(f.to_dense(), qw.dequantize())
    bits = qs._unpack_mask(f.mask)
    assert torch.all(bits.view(13, -1, 8).sum(-1) == 4)
    assert f.codes.shape == (13, 3 * 128 // 4)
    per_group = 2 if sym else 4
    assert f.nbytes() == 13 * 48 + 13 * 96 + 13 * per_group * (384 // group)


def test_nm_deficient_groups():
    w = _nm_pruned(9, 256, 2, 4, seed=1, deficient=True)
    sym = quantize_rtn(w, "int4-g64-sym", mask=w != 0)
    f = qs.Q4NMFormat.from_quantized(sym)  # fillers get code 8: exactly +0.0
    assert torch.equal(f.to_dense(), sym.dequantize())
    assert not torch.signbit(f.to_dense()[0, :8]).any()
    asym = quantize_rtn(w, "int4-g64", mask=w != 0)
    with pytest.raises(SparselandError, match="exact zero"):
        qs.Q4NMFormat.from_quantized(asym)
    f2 = qs.Q4NMFormat.from_dense(w, "int4-g64")  # fillers quantized as kept entries
    assert f2.to_dense().shape == w.shape
    assert (f2.to_dense()[0, :8].abs() <= f2.scale[0, 0].float() / 2 + 1e-6).all()
    with pytest.raises(SparselandError, match="is not 2:4"):
        qs.Q4NMFormat.from_dense(torch.randn(4, 64), "int4-g32")


def test_scheme_requirements():
    w = _pruned(4, 96, 0.5, 0)
    with pytest.raises(SparselandError, match="mask"):
        qs.Q4BitmaskFormat.from_quantized(quantize_rtn(w, "int4-g32"))
    with pytest.raises(SparselandError, match="4-bit"):
        qs.Q4BitmaskFormat.from_quantized(quantize_rtn(w, "int8", mask=w != 0))
    with pytest.raises(SparselandError, match="group size 96"):
        qs.Q4BitmaskFormat.from_quantized(quantize_rtn(w, QuantScheme(4, 0, True), mask=w != 0))


def test_reference_path_is_the_float_product():
    w = _pruned(10, 128, 0.5, 3)
    f = qs.Q4BitmaskFormat.from_dense(w, "int4-g32")
    x = torch.randn(3, 128)
    with kernels.force_reference():
        y = f.matmul(x)
    assert torch.allclose(y, x @ f.to_dense().T, atol=1e-5)


# ----- kernels -------------------------------------------------------------------------------------


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 67),
    ngroups=st.integers(1, 6),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    density=st.sampled_from([0.3, 0.5, 0.7, 0.9]),
    batch=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    isa=st.sampled_from(["avx2", "avx512"]),
    seed=st.integers(0, 10_000),
)
def test_bitmask_kernel(out, ngroups, group, sym, density, batch, threads, isa, seed):
    if isa not in _isas():
        return
    inp = group * ngroups
    w = _pruned(out, inp, density, seed)
    f = qs.Q4BitmaskFormat.from_dense(w, _scheme(group, sym))
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed + 1))
    x[:, seed % inp] *= 50.0  # an outlier channel, as RMSNorm outputs have
    _check_against_refs(f, x, _run(f, x, isa, threads))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 67),
    ngroups=st.integers(1, 6),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    nm=st.sampled_from([(2, 4), (4, 8)]),
    batch=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    isa=st.sampled_from(["avx2", "avx512"]),
    seed=st.integers(0, 10_000),
)
def test_nm_kernel(out, ngroups, group, sym, nm, batch, threads, isa, seed):
    if isa not in _isas():
        return
    inp = group * ngroups
    w = _nm_pruned(out, inp, *nm, seed, deficient=seed % 4 == 0)
    f = qs.Q4NMFormat.from_dense(w, _scheme(group, sym), *nm)
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed + 1))
    x[:, seed % inp] *= 50.0
    _check_against_refs(f, x, _run(f, x, isa, threads))


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_kernels_edge_values(isa):
    if isa not in _isas():
        pytest.skip("no AVX-512 VNNI/VBMI2")
    w = _pruned(40, 4 * 128 + 32, 0.5, 7)
    w[0] = 0.0  # an empty row
    w[1] = torch.where(torch.arange(w.shape[1]) % 2 == 0, 1.0, 0.0)  # all kept codes equal
    w[2] = torch.randn(w.shape[1])  # a dense row (64 codes per 64 columns)
    f = qs.Q4BitmaskFormat.from_dense(w, "int4-g32")
    x = torch.randn(5, w.shape[1])
    x[1] = 0.0  # amax == 0 blocks
    x[2, :64] = 0.0
    x[3] = 1e30  # large but finite
    y = _run(f, x, isa, 1)
    assert torch.all(y[:, 0] == 0) and torch.all(y[1] == 0)
    _check_against_refs(f, x[[0, 2, 4]], y[[0, 2, 4]])


@needs_kernels
def test_avx2_and_avx512_agree_on_a_large_layer():
    w = _nm_pruned(96, 1536, 2, 4, seed=5)
    f = qs.Q4NMFormat.from_dense(w, "int4-g64")
    x = torch.randn(1, 1536)
    ys = {isa: _run(f, x, isa, 2) for isa in _isas()}
    for y in ys.values():
        _check_against_refs(f, x, y)


@needs_kernels
def test_env_var_forces_avx2():
    code = "import torch, sparseland.runtime._C; print(torch.ops.sparseland.qsparse_isa())"
    env = dict(os.environ, SPARSELAND_QUANT_ISA="avx2")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "avx2"


@needs_kernels
def test_malformed_inputs_are_rejected():
    w = _pruned(8, 128, 0.5, 0)
    f = qs.Q4BitmaskFormat.from_dense(w, "int4-g64")
    x = torch.randn(2, 128)
    op = torch.ops.sparseland.q4bitmask_mm
    args = dict(mask=f.mask, row_ptr=f.row_ptr, codes=f.codes, scale=f.scale, offset=f.offset, x=x)

    def call(**kw):
        a = dict(args, **kw)
        return op(a["mask"], a["row_ptr"], a["codes"], a["scale"], a["offset"], a["x"])

    assert torch.allclose(call(), f.matmul(x))
    bad_rp = f.row_ptr.clone()
    bad_rp[-1] += 1000
    bad_rp2 = f.row_ptr.clone()
    bad_rp2[3] = bad_rp2[4] + 1  # decreasing
    bad_rp3 = f.row_ptr.clone()
    bad_rp3[1:] += 1  # row 0 claims one byte more than its mask needs
    cases = [
        dict(x=torch.randn(2, 120)),
        dict(x=torch.randn(2, 128, dtype=torch.float64)),
        dict(x=torch.randn(128, 2).T),
        dict(mask=f.mask.int()),
        dict(mask=f.mask[:, :15]),
        dict(row_ptr=f.row_ptr[:-1]),
        dict(row_ptr=f.row_ptr.int()),
        dict(row_ptr=bad_rp),
        dict(row_ptr=bad_rp2),
        dict(row_ptr=bad_rp3, codes=torch.cat([f.codes, f.codes.new_zeros(1)])),
        dict(codes=f.codes[:-1]),
        dict(codes=f.codes.view(1, -1)),
        dict(scale=f.scale.float()),
        dict(scale=f.scale[:, :1].repeat(1, 3)),  # group 128/3
        dict(scale=f.scale.repeat(1, 2)),  # group 32 ok in size, but offset mismatches
        dict(scale=f.scale[:-1]),
        dict(offset=f.offset[:, :1]),
    ]
    for kw in cases:
        with pytest.raises(RuntimeError):
            call(**kw)
    # the symmetric prefill route (8+ vectors as a dense Q4 weight) checks each row's byte count too
    g = qs.Q4BitmaskFormat.from_dense(w, "int4-g64-sym")
    bad = g.row_ptr.clone()
    bad[1:] += 1
    codes = torch.cat([g.codes, g.codes.new_zeros(1)])
    for batch in (2, 8):
        with pytest.raises(RuntimeError, match="ceil"):
            op(g.mask, bad, codes, g.scale, None, torch.randn(batch, 128))

    g = qs.Q4NMFormat.from_dense(_nm_pruned(8, 128, 2, 4, 0), "int4-g64")
    nm = torch.ops.sparseland.q4nm_mm
    assert torch.allclose(nm(g.mask, g.codes, g.scale, g.offset, x), g.matmul(x))
    for a in [
        (g.mask, g.codes[:, :-1], g.scale, g.offset, x),
        (g.mask, g.codes.reshape(-1), g.scale, g.offset, x),
        (g.mask[:-1], g.codes, g.scale, g.offset, x),
        (g.mask, g.codes, g.scale, g.offset, torch.randn(2, 64)),
        (g.mask, g.codes, torch.zeros(8, 0, dtype=torch.float16), None, x),
        (g.mask[:, :4], g.codes[:, :8], g.scale[:, :1], None, torch.randn(2, 32)),  # in=32, group 32: fine
    ][:-1]:
        with pytest.raises(RuntimeError):
            nm(*a)
    with pytest.raises(RuntimeError):
        torch.ops.sparseland.qsparse_set_isa("sse2")


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("nm", [False, True])
def test_fill_kernels_agree_with_the_per_step_kernels(batch, nm, isa):
    """The symmetric kernels (AVX2 and AVX-512 bitmask: pruned columns filled with code 8, no sum_kept xq per
    step; AVX-512 N:M: the offset joined into the integer dot) and the AVX2 expand-once path for several
    vectors compute the same products as the per-step kernels they replace, each within the tight reference
    bound."""
    if isa not in _isas():
        pytest.skip("no AVX-512 VNNI/VBMI2")
    inp = 4 * 128 + 32  # a 32-column tail step
    if nm:
        f = qs.Q4NMFormat.from_dense(_nm_pruned(37, inp, 2, 4, seed=3), _scheme(32, True))
    else:
        f = qs.Q4BitmaskFormat.from_dense(_pruned(37, inp, 0.5, 3), _scheme(32, True))
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 50.0
    ys = {}
    for on in (True, False):
        prev = torch.ops.sparseland.qsparse_set_fill_kernels(on)
        try:
            ys[on] = _run(f, x, isa, 1)
        finally:
            torch.ops.sparseland.qsparse_set_fill_kernels(prev)
        _check_against_refs(f, x, ys[on])
    if isa == "avx2" or not nm:  # AVX-512 N:M: (q - 8 s) d and q d - 8 s d are often the same floats
        assert not torch.equal(ys[True], ys[False])  # the switch really changes the path (float order differs)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("nm", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_symmetric_prefill_through_the_dense_q4_kernel(isa, nm, group):
    """With 8 or more vectors a symmetric sparse weight runs as a dense Q4 weight (pruned columns code 8, value
    0) through the dense kernel's tiles: within the tight reference bound, and the same as the dense Q4 format of
    the same dense weight (to float summation order)."""
    if isa not in _isas():
        pytest.skip("no AVX-512 VNNI/VBMI2")
    inp = 3 * 128 + (32 if group == 32 else 0)
    w = _nm_pruned(45, inp, 2, 4, seed=11) if nm else _pruned(45, inp, 0.4, 11)
    f = (
        qs.Q4NMFormat.from_dense(w, _scheme(group, True))
        if nm
        else qs.Q4BitmaskFormat.from_dense(w, _scheme(group, True))
    )
    x = torch.randn(13, inp, generator=torch.Generator().manual_seed(12))
    x[:, 3] *= 50.0
    y = _run(f, x, isa, 2)
    _check_against_refs(f, x, y)
    per_vector = torch.cat([_run(f, x[i : i + 1], isa, 1) for i in range(x.shape[0])])
    assert torch.allclose(y, per_vector, rtol=1e-5, atol=1e-4)
