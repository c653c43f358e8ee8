"""Single-vector bitmask and activation-sparse kernels (B == 1 decode paths) == their PyTorch references.

Covers the code paths the shared format tests reach rarely: rows wider than 64 columns (the 8-mask-byte
main loop of the AVX-512 bitmask kernel) with odd tails, all-zero / all-dense masks and rows, empty rows
at the end of the values array (the masked-load rows), 16-row groups of the activation-sparse kernel,
fp32 and bf16, 1 and 2 threads, and the AVX2 table path forced with SPARSELAND_BITMASK_ISA=avx2.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.runtime import kernels
from sparseland.runtime.formats import ActSparseFormat, BitmaskFormat

pytestmark = pytest.mark.skipif(not kernels.extension_available(), reason="C++ kernels are not built")


def _masked_weight(out: int, inp: int, density: float, layout: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    keep = torch.rand(out, inp, generator=g) < density
    if layout == "zero_tail_rows":  # the last rows empty: the kernel's last full-width loads near the end
        keep[out // 2 :] = False
    elif layout == "dense_rows":
        keep[::2] = True
    elif layout == "zero_rows":
        keep[1::2] = False
    elif layout == "one_per_row":
        keep[:] = False
        keep[torch.arange(out), torch.randint(0, inp, (out,), generator=g)] = True
    return w * keep


def _check(fmt, x: torch.Tensor, threads: int) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fmt.matmul(x)
    finally:
        torch.set_num_threads(old)
    with kernels.force_reference():
        ref = fmt.matmul(x)
    dense = x @ fmt.to_dense().float().T
    tol = 1e-4 * (1 + x.abs().sum(-1, keepdim=True))
    assert got.shape == ref.shape == (x.shape[0], fmt.shape[0])
    assert torch.all((got - ref).abs() <= tol), (got - ref).abs().max()
    assert torch.all((ref - dense).abs() <= tol)


@settings(max_examples=80, deadline=None)
@given(
    out=st.integers(1, 80),
    inp=st.integers(1, 700),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.7, 0.95, 1.0]),
    layout=st.sampled_from(["random", "zero_tail_rows", "dense_rows", "zero_rows", "one_per_row"]),
    value_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_bitmask_single_vector(out, inp, density, layout, value_dtype, threads, seed):
    w = _masked_weight(out, inp, density, layout, seed)
    f = BitmaskFormat.from_dense(w, value_dtype)
    assert f.values.numel() == int(f.row_ptr[-1]) + 8  # no slack past the 8 padding zeros
    _check(f, torch.randn(1, inp), threads)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_bitmask_all_zero_and_all_dense(value_dtype, density):
    w = torch.randn(37, 521) * density
    f = BitmaskFormat.from_dense(w, value_dtype)
    _check(f, torch.randn(1, 521), 1)
    _check(f, torch.randn(1, 521), 2)


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 300),
    inp=st.integers(1, 300),
    zero_frac=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    value_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 1, 2]),
    seed=st.integers(0, 10_000),
)
def test_actsparse_single_vector(out, inp, zero_frac, value_dtype, threads, batch, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    f = ActSparseFormat.from_dense(w, value_dtype)
    x = torch.randn(batch, inp, generator=g) * (torch.rand(batch, inp, generator=g) >= zero_frac)
    _check(f, x, threads)


_SCRIPT = """
import torch
from sparseland.runtime.formats import BitmaskFormat
g = torch.Generator().manual_seed(0)
outs = []
for inp, dt in [(576, torch.float32), (333, torch.bfloat16), (1536, torch.float32), (70, torch.bfloat16)]:
    w = torch.randn(64, inp, generator=g) * (torch.rand(64, inp, generator=g) < 0.5)
    w[40:] = 0
    x = torch.randn(1, inp, generator=g)
    outs.append(BitmaskFormat.from_dense(w, dt).matmul(x))
torch.save(outs, {path!r})
"""


def test_avx512_and_avx2_bitmask_paths_agree(tmp_path):
    """The run-time ISA choice is made once per process, so each path runs in its own subprocess."""
    results = {}
    for isa in ("auto", "avx2"):
        path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "SPARSELAND_BITMASK_ISA": isa}
        subprocess.run([sys.executable, "-c", _SCRIPT.format(path=str(path))], check=True, env=env, timeout=300)
        results[isa] = torch.load(path)
    for a, b in zip(results["auto"], results["avx2"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
