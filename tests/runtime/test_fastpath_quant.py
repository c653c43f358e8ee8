"""Quantized and sparse + quantized formats in the runtime: conversion, the fused C++ decode step
against the Python step, prefill on the several-row kernels, and the quantized lm_head."""

import pytest
import torch

import sparseland as sl
from sparseland.quant import QuantConfig
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import compare_fast_and_python, fused_tracks_python, magnitude_prune_
from tests.runtime.helpers import prompt as _prompt


def _quantized(scheme: str, pattern: str | None = None, sparsity: float = 0.0, embeddings: str | None = None):
    model = make_tiny_llama(hidden=128, intermediate=256, heads=4, kv_heads=2, seed=5)
    if pattern or sparsity:
        magnitude_prune_(model, sparsity or 0.5, pattern)
    sl.sparsify_(model, QuantConfig(scheme=scheme, embeddings=embeddings))
    return model


CASES = [
    ("int4-g32", None, 0.0, "q4"),
    ("int4-g64-sym", None, 0.0, "q4"),
    ("int8", None, 0.0, "q8"),
    ("int8-g32", None, 0.0, "q8"),
    ("int4-g64-sym", "2:4", 0.0, "q4_nm"),
    ("int4-g32", None, 0.5, "q4_bitmask"),
    ("int4-g64", None, 0.7, "q4_bitmask"),
]


@pytest.mark.parametrize("scheme,pattern,sparsity,fmt", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_conversion_picks_the_quantized_format(scheme, pattern, sparsity, fmt):
    model = _quantized(scheme, pattern, sparsity)
    ref = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    report = to_sparse_runtime_(model)
    assert report.formats == {fmt: 14}
    lin = model.model.layers[0].mlp.down_proj
    assert isinstance(lin, SparseLinear) and torch.equal(lin.weight_format.to_dense(), ref)
    assert report.runtime_bytes < report.dense_bytes / (3.7 if fmt == "q8" else 5)  # 8.5 or <= 5 bits, not 32


def test_asymmetric_two_four_with_short_groups_falls_back_to_bitmask():
    model = _quantized("int4-g32", "2:4")
    w = model.model.layers[0].self_attn.q_proj
    qw = w._sparseland_quant
    qw.mask[0, :4] = torch.tensor([True, False, False, False])  # a group keeping 1 of 4
    qw.codes[0, 1] = 0
    w.weight.data.copy_(qw.dequantize())
    report = to_sparse_runtime_(model)
    assert report.formats["q4_bitmask"] >= 1 and report.formats["q4_nm"] >= 1


@pytest.mark.parametrize("scheme,pattern,sparsity,fmt", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_step_matches_python_step(scheme, pattern, sparsity, fmt, threads):
    """Both steps run the same quantized kernels, but the fused step's RMSNorm differs from torch's in the
    last bits, and the kernels round x to int8: a last-bit difference can move one x entry by one int8
    step. So the two agree to the x-rounding error (well under 1%), not to float rounding."""
    model = _quantized(scheme, pattern, sparsity)
    to_sparse_runtime_(model)
    fast, ref = fused_tracks_python(model, prompt_len=6, max_len=12, threads=threads)
    for x, y in ((fast.k_cache, ref.k_cache), (fast.v_cache, ref.v_cache)):
        assert float((x - y).norm() / y.norm()) < 1e-2


def test_fused_step_on_a_float_model_still_matches_exactly():
    compare_fast_and_python(make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=3), steps=3)


@pytest.mark.parametrize("embeddings", ["int8", "int8-g32"])
def test_quantized_model_tracks_the_float_model(embeddings):
    """Decoding on the integer kernels (x rounded to int8 per block), fused step and lm_head included,
    stays close to the float model with the same dequantized weights."""
    import copy

    model = _quantized("int4-g32", embeddings=embeddings)
    fast = copy.deepcopy(model)  # keeps each module's QuantizedWeight
    to_sparse_runtime_(fast)
    assert isinstance(fast.lm_head, SparseLinear) and fast.lm_head.weight_format.name == "q8"
    ids = _prompt(1, 12)
    dec = LeanDecoder(fast, 16)
    assert dec.fast is not None
    dec.step(ids[:, :-1])
    got = dec.step(ids[:, -1:])  # the last token through the fused step
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    assert float((got - want).norm() / want.norm()) < 0.05


def test_prefill_uses_the_several_row_kernel(monkeypatch):
    model = _quantized("int4-g32")
    to_sparse_runtime_(model)
    f = model.model.layers[0].mlp.up_proj.weight_format
    monkeypatch.setattr(type(f), "to_dense", lambda self: (_ for _ in ()).throw(AssertionError("dense rebuild")))
    out = greedy_generate(model, _prompt(2, 48), 3, stop_at_eos=False)  # 48 rows > DENSE_ROWS
    assert len(out.tokens) == 3
