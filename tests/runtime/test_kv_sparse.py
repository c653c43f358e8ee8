"""The Mustafar-style unstructured sparse KV cache of the lean loop (``LeanDecoder(kv_dtype="sparse")``):
the bitmap format (``prune_kv``/``unprune_kv``), its bytes, logits against the float32 cache, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.evaluate import evaluate_longctx
from sparseland.runtime.generate import LeanDecoder, greedy_generate, kv_keep_count, prune_kv, unprune_kv
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def _top_k_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


@pytest.mark.parametrize(("D", "keep"), [(64, 0.5), (64, 0.3), (20, 0.5), (13, 0.25), (8, 1.0), (16, 0.01)])
def test_round_trip_keeps_exactly_the_top_k_magnitudes(D, keep):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 3, 17, D, generator=g) * torch.logspace(-3, 2, 17).view(1, 1, 17, 1)
    k = math.ceil(keep * D)
    assert kv_keep_count(keep, D) == k
    bits, values = prune_kv(x, keep)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 3, 17, (D + 7) // 8)
    assert values.dtype == torch.float32 and values.shape == (2, 3, 17, k)
    y = unprune_kv(bits, values, D)
    assert torch.equal(y, _top_k_reference(x, k))  # kept entries bit-exact, the rest zero
    assert bool(((y != 0).sum(-1) == k).all())
    # the bitmap: column j is bit j % 8 of byte j // 8, set exactly where y is nonzero
    unpacked = torch.stack([(bits[..., j // 8] >> (j % 8)) & 1 for j in range(D)], -1).bool()
    assert torch.equal(unpacked, y != 0)
    # values in column order
    assert torch.equal(values, x.gather(-1, x.abs().topk(k, dim=-1).indices.sort(-1).values))


def test_fewer_nonzeros_than_k_pad_with_zeros():
    x = torch.zeros(3, 10)
    x[1, [2, 7]] = torch.tensor([-3.0, 0.5])  # 2 nonzeros, k = 5
    x[2] = torch.arange(1.0, 11.0)
    bits, values = prune_kv(x, 0.5)
    assert not bits[0].any() and not values[0].any()
    assert values[1].tolist() == [-3.0, 0.5, 0.0, 0.0, 0.0]
    assert bits[1].tolist() == [(1 << 2) | (1 << 7), 0]  # only the nonzero columns 2 and 7 are set
    assert values[2].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0]
    assert bits[2].tolist() == [0b11100000, 0b11]  # columns 5..9
    expected = x.clone()
    expected[2, :5] = 0.0  # row 2 loses its 5 smallest; rows 0 and 1 have no more than k nonzeros
    assert torch.equal(unprune_kv(bits, values, 10), expected)


def test_cache_bytes_at_head_dim_64():
    model = make_tiny_llama(hidden=256, heads=4, kv_heads=2)  # head_dim 64
    L, KVH, T, D = 2, 2, 40, 64
    f32 = LeanDecoder(model, T).kv_cache_bytes()
    sp = LeanDecoder(model, T, kv_dtype="sparse", kv_keep=0.5)
    assert sp.head_dim == D and sp.fast is None  # the fused step does not run the sparse cache
    assert sp.kv_cache_bytes() == 2 * L * KVH * T * (D // 8 + 32 * 4)  # bitmap + 32 float32 values, K and V
    assert sp.kv_cache_bytes() / f32 == (64 / 8 + 32 * 4) / 256 == 0.53125
    k = math.ceil(0.3 * D)  # 20
    assert LeanDecoder(model, T, kv_dtype="sparse", kv_keep=0.3).kv_cache_bytes() == 2 * L * KVH * T * (8 + 4 * k)


def _python(model, T, kv_dtype, kv_keep=0.5):
    dec = LeanDecoder(model, T, kv_dtype=kv_dtype, kv_keep=kv_keep)
    dec.fast = None  # the reference step
    return dec


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_keep_one_equals_float32(kv_heads):
    model = make_tiny_llama(hidden=128, heads=4, kv_heads=kv_heads)
    ids, steps = prompt(1, 24), 8
    f, s = _python(model, 24 + steps, "float32"), _python(model, 24 + steps, "sparse", 1.0)
    a, b = f.step(ids), s.step(ids)
    for _ in range(steps):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)  # every entry kept: the same cache
        tok = torch.tensor([[int(a.argmax())]])
        a, b = f.step(tok), s.step(tok)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    ref = greedy_generate(model, ids, 10, stop_at_eos=False).tokens
    assert greedy_generate(model, ids, 10, stop_at_eos=False, kv_dtype="sparse", kv_keep=1.0).tokens == ref


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_keep_half_logits_close_to_float32(kv_heads):
    """Bound 0.3 on ||logits_sparse - logits_f32|| / ||logits_f32||. The tiny random model's K/V entries
    are close to Gaussian; dropping the half of a Gaussian vector's entries with the smallest |x|
    (|x| < 0.674 sigma) removes E[x^2; |x| < 0.674] = 0.5 - 2 * 0.674 * phi(0.674) = 7.1% of its
    energy, a relative error of sqrt(0.071) = 0.27 per K and V vector; attention averages V and the
    residual stream carries the unpruned part, so the logits' error is below that (0.21 measured at
    every step, both head layouts). 0.3 leaves room for seeds and still fails a broken cache: keep
    0.25 gives 0.45-0.53, and a cache of the wrong tokens ~1."""
    model = make_tiny_llama(hidden=128, heads=4, kv_heads=kv_heads)  # head_dim 32
    ids, steps = prompt(1, 24), 12
    errs = {}
    for keep in (0.75, 0.5, 0.25):
        f, s = _python(model, 24 + steps, "float32"), _python(model, 24 + steps, "sparse", keep)
        a, b = f.step(ids), s.step(ids)
        e = [float((b - a).norm() / a.norm())]
        for _ in range(steps):  # the same (float32's greedy) tokens into both
            tok = torch.tensor([[int(a.argmax())]])
            a, b = f.step(tok), s.step(tok)
            e.append(float((b - a).norm() / a.norm()))
        errs[keep] = max(e)
        assert bool((s.k_bits[:, :, : 24 + steps].sum(-1) > 0).all())  # every position written
        assert not s.k_bits[:, :, 24 + steps :].any()
    assert 0 < errs[0.5] < 0.3
    assert errs[0.75] < errs[0.5] < errs[0.25]  # less kept, further from float32


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_bad_kv_keep_raises(tiny_llama, keep):
    with pytest.raises(SparselandError, match=r"kv_keep=.* must be a number in \(0, 1\]"):
        LeanDecoder(tiny_llama, 8, kv_dtype="sparse", kv_keep=keep)
    with pytest.raises(SparselandError, match="kv_keep="):
        greedy_generate(tiny_llama, prompt(0, 4), 2, kv_dtype="sparse", kv_keep=keep)
    with pytest.raises(SparselandError, match="kv_keep="):
        prune_kv(torch.ones(2, 8), keep)
    with pytest.raises(SparselandError, match="kv_keep="):
        evaluate_longctx(tiny_llama, None, [object()], kv_dtype="sparse", kv_keep=keep)


def test_attention_methods_refuse_sparse_naming_the_fix():
    from sparseland.api import sparsify_
    from sparseland.attention import H2OConfig, QuestConfig

    for config in (QuestConfig(keep=0.25, page_size=4), H2OConfig(keep=0.5)):
        model = make_tiny_llama()
        sparsify_(model, config)
        with pytest.raises(SparselandError, match="the sparse KV cache runs dense attention only.*kv_dtype='float32'"):
            LeanDecoder(model, 16, kv_dtype="sparse")
        LeanDecoder(model, 16)  # float32 still runs it


def test_method_applied_after_the_decoder_is_refused():
    from sparseland.api import sparsify_
    from sparseland.attention import QuestConfig

    model = make_tiny_llama()
    dec = LeanDecoder(model, 16, kv_dtype="sparse")
    sparsify_(model, QuestConfig(keep=0.25, page_size=4))
    with pytest.raises(SparselandError, match="sparse KV cache runs dense attention only"):
        dec.step(prompt(0, 4))
