"""C++ kernels == pure-PyTorch references over random shapes, sparsities, dtypes and thread counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.runtime import kernels
from sparseland.runtime.formats import FORMATS, NMFormat, make_format

pytestmark = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")


def _weight(out: int, inp: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


def _nm_weight(out: int, inp: int, n: int, m: int, seed: int) -> torch.Tensor:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    g = w.view(out, -1, m)
    g.scatter_(-1, g.abs().topk(m - n, dim=-1, largest=False).indices, 0.0)
    return w


def _check(fmt, x, value_dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fmt.matmul(x)
        with kernels.force_reference():
            ref = fmt.matmul(x)
    finally:
        torch.set_num_threads(old)
    dense = x @ fmt.to_dense().float().T
    tol = 1e-4 * (1 + x.abs().sum(-1, keepdim=True))  # fp32 accumulation order differs
    assert got.shape == ref.shape == dense.shape
    assert torch.all((got - ref).abs() <= tol), (got - ref).abs().max()
    assert torch.all((ref - dense).abs() <= tol)


shapes = st.tuples(st.integers(1, 70), st.integers(1, 150), st.integers(1, 9))


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    density=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.77, 1.0]),
    fmt=st.sampled_from(["dense", "bitmask", "actsparse"]),
    value_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
def test_weight_formats_match_reference(shape, density, fmt, value_dtype, threads, seed):
    out, inp, batch = shape
    w = _weight(out, inp, density, seed)
    f = FORMATS[fmt].from_dense(w, value_dtype)
    assert torch.equal(f.to_dense(), w.to(value_dtype))
    x = torch.randn(batch, inp)
    if fmt == "actsparse":  # activation sparsity: many exact zeros in x
        x = x * (torch.rand(batch, inp) < density)
    _check(f, x, value_dtype, threads)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    groups=st.integers(1, 40),
    nm=st.sampled_from([(2, 4), (4, 8), (1, 2)]),
    batch=st.integers(1, 6),
    value_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_nm_matches_reference(out, groups, nm, batch, value_dtype, threads, seed):
    n, m = nm
    w = _nm_weight(out, groups * m, n, m, seed)
    if seed % 3 == 0:
        w[:, : m * (groups // 2)] = 0.0  # groups with fewer than n nonzeros
    f = NMFormat.from_dense(w, value_dtype, n, m)
    assert torch.equal(f.to_dense(), w.to(value_dtype))
    _check(f, torch.randn(batch, groups * m), value_dtype, threads)


def test_auto_format_choice():
    assert make_format(_nm_weight(16, 32, 2, 4, 0)).name == "nm"
    assert make_format(_weight(16, 32, 0.5, 0)).name == "bitmask"
    assert make_format(_weight(16, 32, 1.0, 0)).name == "dense"
    bm = make_format(_weight(64, 576, 0.5, 0))
    assert bm.nbytes() / (64 * 576 * 4) < 0.55


def test_force_reference_env(monkeypatch):
    monkeypatch.setenv("SPARSELAND_FORCE_REFERENCE", "1")
    assert not kernels.use_kernels()
    monkeypatch.setenv("SPARSELAND_FORCE_REFERENCE", "0")
    assert kernels.use_kernels()


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.setitem(kernels._state, "loaded", False)
    monkeypatch.setitem(kernels._state, "warned", False)
    f = make_format(_weight(8, 16, 0.5, 1), "bitmask")
    x = torch.randn(2, 16)
    with pytest.warns(RuntimeWarning, match="not built"):
        y = f.matmul(x)
    assert torch.allclose(y, x @ f.to_dense().T)
