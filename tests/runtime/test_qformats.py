"""Dense quantized formats (q4, q8): C++ kernels == the float64 emulation of their integer math
(tight), == x @ W^T within the bound set by rounding x to int8 per block of 32 (rigorous), both ISA
paths (AVX-512 VNNI and the AVX2 path forced with SPARSELAND_QUANT_ISA=avx2), layout round trips,
byte counts and input checks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantScheme, quantize_rtn
from sparseland.runtime import kernels
from sparseland.runtime import qformats as Q

pytestmark = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")

Q4_SCHEMES = ["int4-g32", "int4-g32-sym", "int4-g64", "int4-g64-sym", "int4-g128", "int4-g128-sym"]


def _expanded_offsets(f) -> torch.Tensor:
    """(out, in) float32 offsets m of every weight (q4), zeros for q8."""
    if isinstance(f, Q.Q8DenseFormat):
        return torch.zeros(f.shape)
    m = f.scale.float() * -8.0 if f.offset is None else f.offset.float()
    return m.repeat_interleave(f.group, dim=1)


def _bounds(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, out) tolerances: ``tight`` for kernel vs the exact emulation (float32 rounding of the
    per-block products, ~1e-7 of the terms' magnitude A; 1e-6 A is still below the effect of one xq
    off by one, |w| |x| / 127, for in < ~7000), and ``xround`` for kernel vs x @ W^T: the kernels
    compute W @ x_rounded (the q4 offset term too takes the rounded x's sums), each x off by at most
    dx/2, so |error| <= sum_c |W| dx/2."""
    w = f.to_dense()
    wm = (w - _expanded_offsets(f)).abs()  # |d * q|
    A = x.abs() @ (w.abs() + wm).T
    _, dx = Q.quantize_x(x)  # (B, nblk)
    half = (dx / 2).repeat_interleave(Q.BLOCK, dim=1)[:, : x.shape[1]]  # (B, in)
    tight = 1e-6 * A + 1e-6
    return tight, half @ w.abs().T + tight


def _run(f, x, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return f.matmul(x)
    finally:
        torch.set_num_threads(old)


def _check(f, x, threads=1):
    got = _run(f, x, threads)
    exact = f.reference(x)
    dense = x @ f.to_dense().T
    tight, xround = _bounds(f, x)
    assert got.shape == exact.shape == dense.shape == (x.shape[0], f.shape[0])
    assert torch.all((got - exact).abs() <= tight), (got - exact).abs().max()
    assert torch.all((got - dense).abs() <= xround), ((got - dense).abs() - xround).max()


def _x(batch, inp, seed, zero_blocks=False):
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed + 1))
    if zero_blocks and inp >= 64:
        x[:, 32:64] = 0.0  # an all-zero block: dx = 0
    return x


@settings(max_examples=80, deadline=None)
@given(
    out=st.integers(1, 67),
    scheme=st.sampled_from(Q4_SCHEMES),
    groups=st.integers(1, 5),
    batch=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_q4_kernel_matches_references(out, scheme, groups, batch, threads, seed):
    s = QuantScheme.parse(scheme)
    inp = s.group * groups
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    if seed % 4 == 0:
        w[:, : s.group] = 0.5  # a constant group: scale 0
    f = Q.Q4DenseFormat.from_dense(w, s)
    _check(f, _x(batch, inp, seed, zero_blocks=seed % 3 == 0), threads)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 67),
    inp=st.integers(1, 300),
    batch=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_q8_kernel_matches_references(out, inp, batch, threads, seed):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    f = Q.Q8DenseFormat.from_dense(w)
    _check(f, _x(batch, inp, seed, zero_blocks=seed % 3 == 0), threads)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 67),
    group=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 7),
    batch=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_q8_group_kernel_matches_references(out, group, groups, batch, threads, seed):
    """int8 with a scale per group (int8-g32 = Q8_0's grid); odd block counts leave a half pair (AVX-512)."""
    inp = group * groups
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    w[:, :group] *= 100.0  # groups of very different ranges: a per-row scale would not do
    if seed % 4 == 0:
        w[:, group : 2 * group] = 0.0  # a zero group: scale 0
    f = Q.Q8DenseFormat.from_quantized(quantize_rtn(w, f"int8-g{group}"))
    assert f.scale.shape == (out, groups)
    assert f.scheme.name == (f"int8-g{group}" if groups > 1 else "int8")  # one group per row: the same math
    _check(f, _x(batch, inp, seed, zero_blocks=seed % 3 == 0), threads)


def test_int8_g32_reproduces_a_q8_0_grid_exactly():
    """Q8_0 (llama.cpp): d = max|w| / 127 per 32, w = d * q with q in [-127, 127] and float16 d. Rebuilding
    such a weight with int8-g32 gives back its exact values (the shipped model's token_embd is Q8_0)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (16, 128), generator=g)
    q[:, ::32] = 127 * torch.where(torch.rand(16, 4, generator=g) < 0.5, -1, 1)  # each block reaches +-127
    d = (torch.rand(16, 4, generator=g) * 0.01 + 1e-4).half().float().repeat_interleave(32, dim=1)
    w = d * q
    qw = quantize_rtn(w, "int8-g32")
    assert torch.equal(qw.dequantize(), w)
    assert torch.equal(Q.Q8DenseFormat.from_quantized(qw).to_dense(), w)


@pytest.mark.parametrize("scheme", [*Q4_SCHEMES, "int8", "int8-g32"])
def test_realistic_layer_error_is_about_one_percent(scheme):
    """(64, 1536) layer, 17 vectors (tiles 8 + 8 + 1): relative error to x @ W^T of the whole output."""
    w = torch.randn(64, 1536, generator=torch.Generator().manual_seed(0)) * 0.02
    f = Q.make_qformat(quantize_rtn(w, scheme))
    x = _x(17, 1536, 0)
    got = f.matmul(x)
    dense = x @ f.to_dense().T
    rel = float((got - dense).norm() / dense.norm())
    assert rel < (1e-2 if scheme.startswith("int8") else 2.5e-2), rel  # measured ~0.5% (int8), ~1-1.5% (int4)
    _check(f, x, threads=2)


@pytest.mark.parametrize("scheme", [*Q4_SCHEMES, "int8", "int8-g32", "int8-g128"])
def test_to_dense_is_dequantize_bit_for_bit(scheme):
    w = torch.randn(13, 256, generator=torch.Generator().manual_seed(1))
    w[0, :128] = 0.0
    qw = quantize_rtn(w, scheme)
    f = Q.make_qformat(qw)
    assert f.shape == (13, 256)
    assert torch.equal(f.to_dense().view(torch.int32), qw.dequantize().view(torch.int32))
    if not scheme.startswith("int8"):
        assert torch.equal(Q.unpack_q4(f.codes), qw.codes)


def test_q4_byte_order_is_llama_cpp_block_order():
    codes = (torch.arange(64, dtype=torch.uint8) // 4).reshape(1, 64)  # column j -> j // 4: lo != hi nibble
    packed = Q.pack_q4(codes)
    assert packed.shape == (1, 32)
    assert int(packed[0, 0]) == (codes[0, 0] | (codes[0, 16] << 4))
    assert int(packed[0, 17]) == (codes[0, 33] | (codes[0, 49] << 4)) == 8 | (12 << 4)
    assert int(packed[0, 0]) == 0 | (4 << 4)


@pytest.mark.parametrize(
    ("scheme", "per_weight"),
    [
        ("int4-g32", 0.625),
        ("int4-g32-sym", 0.5625),
        ("int4-g64", 0.5625),
        ("int4-g128-sym", 0.515625),
        ("int8", None),
        ("int8-g32", 1.0625),
    ],
)
def test_nbytes_counts_the_tensors(scheme, per_weight):
    f = Q.make_qformat(quantize_rtn(torch.randn(24, 512), scheme))
    ts = [v for v in vars(f).values() if isinstance(v, torch.Tensor)]
    assert f.nbytes() == sum(t.numel() * t.element_size() for t in ts)
    expect = 24 * 512 * per_weight if per_weight else 24 * 512 + 24 * 2
    assert f.nbytes() == expect


def test_unsupported_schemes_raise():
    w = torch.randn(8, 96)
    with pytest.raises(SparselandError, match="int8"):
        Q.Q8DenseFormat.from_quantized(quantize_rtn(torch.randn(8, 96), "int8-g32-asym"))
    with pytest.raises(SparselandError, match="int8"):
        Q.Q8DenseFormat.from_quantized(quantize_rtn(torch.randn(8, 96), "int4-g32"))
    with pytest.raises(SparselandError, match="q4 format"):
        Q.Q4DenseFormat.from_quantized(quantize_rtn(w, "int8"))
    with pytest.raises(SparselandError):
        Q.Q4DenseFormat.from_dense(w, "int4-g64")  # 96 columns: not a multiple of 64
    with pytest.raises(SparselandError, match="mask"):
        Q.Q4DenseFormat.from_quantized(quantize_rtn(w, "int4-g32", mask=w > 0))


def test_bad_inputs_raise():
    f = Q.Q4DenseFormat.from_dense(torch.randn(8, 128), "int4-g64")
    x = torch.randn(2, 128)
    op = torch.ops.sparseland.q4_mm
    assert torch.equal(op(f.codes, f.scale, f.offset, 64, x), f.matmul(x))
    bad = [
        ((f.codes, f.scale, f.offset, 64, x.double()), "float32"),
        ((f.codes, f.scale, f.offset, 64, torch.randn(128, 2).T), "contiguous"),
        ((f.codes, f.scale, f.offset, 64, torch.randn(2, 96)), "features"),
        ((f.codes.to(torch.int8), f.scale, f.offset, 64, x), "uint8"),
        ((f.codes, f.scale, f.offset, 32, x), "scale"),
        ((f.codes, f.scale, f.offset, 48, x), "group"),
        ((f.codes, f.scale.float(), f.offset, 64, x), "float16"),
        ((f.codes, f.scale, f.offset[:, :1].contiguous(), 64, x), "offset"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    g = Q.Q8DenseFormat.from_dense(torch.randn(8, 100))
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.sparseland.q8_mm(g.codes.to(torch.uint8), g.scale, torch.randn(1, 100))
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.sparseland.q8_mm(g.codes, g.scale[:4], torch.randn(1, 100))
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.sparseland.q8_mm(g.codes, g.scale, torch.randn(1, 99))
    with pytest.raises(RuntimeError, match="group"):  # 100 columns / 4 scales: groups of 25
        torch.ops.sparseland.q8_mm(g.codes, g.scale.repeat(1, 4), torch.randn(1, 100))


def test_reference_fallback_is_the_emulation():
    f = Q.Q4DenseFormat.from_dense(torch.randn(5, 64), "int4-g32")
    x = torch.randn(3, 64)
    with kernels.force_reference():
        assert torch.equal(f.matmul(x), f.reference(x))


_SCRIPT = textwrap.dedent(
    """
    import torch
    from sparseland.quant.scheme import quantize_rtn
    from sparseland.runtime import qformats as Q
    from tests.runtime.test_qformats import _check, _x
    assert Q.quant_isa() == {isa!r}, Q.quant_isa()
    for i, (out, inp, scheme) in enumerate([(67, 576, "int4-g32"), (9, 96, "int4-g32-sym"), (33, 576, "int4-g64"),
                                            (20, 384, "int4-g128-sym"), (31, 1536, "int4-g128"), (17, 100, "int8"),
                                            (40, 576, "int8"), (40, 576, "int8-g32"), (23, 96, "int8-g32"),
                                            (12, 256, "int8-g128")]):
        f = Q.make_qformat(quantize_rtn(torch.randn(out, inp, generator=torch.Generator().manual_seed(i)), scheme))
        for batch, threads in ((1, 1), (1, 2), (5, 1), (17, 2)):  # decode entry point; tiles 4+1 / 8+8+1
            _check(f, _x(batch, inp, i, zero_blocks=True), threads)
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["avx2", "native"])
def test_isa_paths_match_the_references(isa):
    """The ISA is chosen once per process, so each path runs in its own subprocess."""
    env = dict(os.environ)
    env.pop("SPARSELAND_QUANT_ISA", None)
    if isa == "avx2":
        env["SPARSELAND_QUANT_ISA"] = "avx2"
        expect = "avx2"
    else:
        code = "import torch, sparseland.runtime._C; print(torch.ops.sparseland.quant_isa())"
        expect = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        expect = expect.stdout.strip()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(isa=expect)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
