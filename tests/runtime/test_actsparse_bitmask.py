"""The combined activation-sparse + weight-sparse format: kernel == reference == dense matmul, and the
runtime picks it for activation-sparse layers of a pruned model without changing the logits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.activations import TEALConfig
from sparseland.api import sparsify_
from sparseland.errors import SparselandError
from sparseland.runtime import kernels
from sparseland.runtime.formats import ActSparseBitmaskFormat, make_act_format, make_format
from sparseland.runtime.generate import greedy_generate
from sparseland.runtime.modules import SparseLinear, activation_sparse_layers, to_sparse_runtime_
from sparseland.weights import WandaConfig
from tests.conftest import make_tiny_llama

needs_kernels = pytest.mark.skipif(
    not kernels.extension_available() or not hasattr(torch.ops.sparseland, "actsparse_bitmask_mm"),
    reason="C++ kernels are not built",
)
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))


def _weight(out: int, inp: int, density: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def _input(batch: int, inp: int, x_density: float, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(batch, inp, generator=g)
    return x * (torch.rand(batch, inp, generator=g) < x_density)


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(
    out=st.integers(1, 100),
    inp=st.integers(1, 130),
    batch=st.integers(1, 4),
    w_density=st.sampled_from([1.0, 0.5, 0.1, 0.0]),  # weight sparsity 0, 0.5, 0.9, 1.0
    x_density=st.sampled_from([0.0, 0.3, 0.5, 1.0]),  # all inputs zero ... none zero
    value_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_kernel_matches_reference_and_dense(out, inp, batch, w_density, x_density, value_dtype, threads, seed):
    g = torch.Generator().manual_seed(seed)
    w = _weight(out, inp, w_density, g)
    x = _input(batch, inp, x_density, g)
    f = ActSparseBitmaskFormat.from_dense(w, value_dtype)
    assert f.shape == (out, inp)
    assert torch.equal(f.to_dense(), w.to(value_dtype))
    assert f.nbytes() == ActSparseBitmaskFormat.predicted_nbytes(w, value_dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = f.matmul(x)  # AVX-512 where the CPU has it
        got_avx2 = torch.ops.sparseland.actsparse_bitmask_mm(f.mask, f.row_ptr, f.values, x, out, 0)
    finally:
        torch.set_num_threads(old)
    ref = f.reference(x)
    with kernels.force_reference():
        assert torch.equal(f.matmul(x), ref)  # the forced path is the reference
    dense = x @ w.to(value_dtype).float().T
    tol = 1e-4 * (1 + x.abs().sum(-1, keepdim=True))  # fp32 accumulation order differs
    assert got.shape == ref.shape == dense.shape == (batch, out)
    assert torch.all((got - ref).abs() <= tol), (got - ref).abs().max()
    assert torch.all((got_avx2 - ref).abs() <= tol), (got_avx2 - ref).abs().max()
    assert torch.all((ref - dense).abs() <= tol), (ref - dense).abs().max()
    if x_density == 0.0 or w_density == 0.0:
        assert torch.equal(got, torch.zeros(batch, out)) and torch.equal(got_avx2, got)


@needs_kernels
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), threads=st.sampled_from([1, 2]), value_dtype=st.sampled_from(["f32", "bf16"]))
def test_kernel_on_model_shapes(seed, threads, value_dtype):
    """Larger layers (SmolLM2's MLP and attention shapes) with 50% zero weights and inputs."""
    dt = torch.float32 if value_dtype == "f32" else torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    for out, inp in ((1536, 576), (576, 1536), (192, 576)):
        f = ActSparseBitmaskFormat.from_dense(_weight(out, inp, 0.5, g), dt)
        x = _input(1, inp, 0.5, g)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = f.matmul(x)
            got_avx2 = torch.ops.sparseland.actsparse_bitmask_mm(f.mask, f.row_ptr, f.values, x, out, 0)
        finally:
            torch.set_num_threads(old)
        tol = 1e-4 * (1 + float(x.abs().sum()))
        torch.testing.assert_close(got, f.reference(x), atol=tol, rtol=0)
        torch.testing.assert_close(got_avx2, f.reference(x), atol=tol, rtol=0)


def test_kernel_rejects_a_wrong_out() -> None:
    f = ActSparseBitmaskFormat.from_dense(torch.randn(20, 9))
    if not kernels.use_kernels() or not hasattr(torch.ops.sparseland, "actsparse_bitmask_mm"):
        pytest.skip("C++ kernels are not built")
    with pytest.raises(RuntimeError, match="out=30"):
        torch.ops.sparseland.actsparse_bitmask_mm(f.mask, f.row_ptr, f.values, torch.randn(1, 9), 30)
    with pytest.raises(RuntimeError, match="features"):
        f.matmul(torch.randn(1, 8))


def test_layout_is_the_documented_one() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])  # (out=3, in=2)
    f = ActSparseBitmaskFormat.from_dense(w)
    # W^T rows: input 0 -> outputs {0, 2} = 0b101, input 1 -> outputs {1, 2} = 0b110
    assert f.mask.tolist() == [[0b101], [0b110]]
    assert f.row_ptr.tolist() == [0, 2, 4]
    assert f.values.tolist() == [1.0, 3.0, 2.0, 4.0] + [0.0] * 8
    assert f.nbytes() == 2 * 1 + 8 * 3 + 12 * 4


def test_format_choice_by_size() -> None:
    g = torch.Generator().manual_seed(0)
    assert make_act_format(_weight(64, 32, 0.5, g)).name == "actsparse_bitmask"
    assert make_act_format(torch.randn(64, 32, generator=g)).name == "actsparse"  # no zeros: dense rows win
    assert make_act_format(_weight(64, 32, 0.95, g), torch.bfloat16).name == "actsparse"
    assert make_format(_weight(8, 8, 0.5, g), "actsparse_bitmask").name == "actsparse_bitmask"
    with pytest.raises(SparselandError, match="actsparse_bitmask"):
        make_format(torch.randn(8, 8), "actsparse_bitmsk")


def _pruned_teal_model():
    model = make_tiny_llama()
    sparsify_(model, WandaConfig(sparsity=0.5), calibration=CALIB)
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=CALIB)
    return model


@pytest.mark.parametrize("force_reference", [False, True], ids=["kernels", "reference"])
def test_wanda_plus_teal_runtime_keeps_the_logits(force_reference, monkeypatch) -> None:
    if force_reference:
        monkeypatch.setenv("SPARSELAND_FORCE_REFERENCE", "1")
    elif not kernels.extension_available() or not hasattr(torch.ops.sparseland, "actsparse_bitmask_mm"):
        pytest.skip("C++ kernels are not built")
    model = _pruned_teal_model()
    want_logits = model(IDS).logits
    want = greedy_generate(model, IDS, 8, stop_at_eos=False).tokens
    act, _ = activation_sparse_layers(model)
    report = to_sparse_runtime_(model, format="auto")
    mods = dict(model.named_modules())
    assert act and all(mods[n].weight_format.name == "actsparse_bitmask" for n in act)
    others = [m for n, m in mods.items() if isinstance(m, SparseLinear) and n not in act and "lm_head" not in n]
    assert all(m.weight_format.name == "bitmask" for m in others)  # pruned, dense inputs: weight sparsity only
    assert report.formats.get("actsparse_bitmask") == len(act) and report.ratio < 0.6
    torch.testing.assert_close(model(IDS).logits, want_logits, atol=1e-4, rtol=1e-4)
    assert greedy_generate(model, IDS, 8, stop_at_eos=False).tokens == want


def test_explicit_actsparse_keeps_the_dense_rows() -> None:
    model = _pruned_teal_model()
    want = model(IDS).logits
    act, _ = activation_sparse_layers(model)
    to_sparse_runtime_(model, format="actsparse")
    mods = dict(model.named_modules())
    assert all(mods[n].weight_format.name == "actsparse" for n in act)
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_unpruned_activation_sparse_model_keeps_actsparse() -> None:
    model = make_tiny_llama()
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=CALIB)
    act, _ = activation_sparse_layers(model)
    to_sparse_runtime_(model)
    mods = dict(model.named_modules())
    assert all(mods[n].weight_format.name == "actsparse" for n in act)
