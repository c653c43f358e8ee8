"""Quest inside the fused C++ decode step (csrc/decode_step.cpp) against the Python step's Quest
(sparseland.attention.methods), which is the reference."""

import pytest
import torch

from sparseland.api import sparsify_
from sparseland.attention import QuestConfig, attention_method, measured_sparsity, remove, reset_sparsity
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import compare_fast_and_python, prompt, require_fast_step


def _quest_model(kv_heads=2, layers=3, seed=11, **cfg):
    model = make_tiny_llama(layers=layers, heads=4, kv_heads=kv_heads, seed=seed)
    sparsify_(model, QuestConfig(**{"keep": 0.25, "page_size": 4, "dense_layers": 1, **cfg}))
    return model


@pytest.mark.parametrize("refine", [1.0, 3.0], ids=["quest", "refine3"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("threads,mode", [(1, "region"), (2, "region"), (2, "per_matvec")])
def test_fused_quest_equals_python_quest(refine, kv_heads, threads, mode):
    model = _quest_model(kv_heads, refine=refine)
    # a 41-token prompt: 10 full pages of 4 and a partial one; pages complete during the 9 steps
    compare_fast_and_python(model, steps=9, prompt_len=41, mode=mode, threads=threads, seed=kv_heads)


@pytest.mark.parametrize("page_size,dense_layers", [(1, 0), (8, 2), (16, 0)])
def test_fused_quest_other_pages(page_size, dense_layers):
    model = _quest_model(page_size=page_size, dense_layers=dense_layers, keep=0.3, refine=2.0)
    compare_fast_and_python(model, steps=6, prompt_len=37, seed=page_size)


def test_fused_quest_differs_from_dense_and_keeps_everything_at_keep_one():
    require_fast_step()
    ids = prompt(5, 41)
    dense = make_tiny_llama(layers=3, heads=4, kv_heads=2, seed=11)
    want = greedy_generate(dense, ids, 6, stop_at_eos=False).tokens
    logits = {}
    for keep in (1.0, 0.1):
        model = _quest_model(keep=keep, dense_layers=0)
        dec = LeanDecoder(model, 48)
        assert dec.fast is not None and dec.fast.method is attention_method(model)
        dec.step(ids)
        logits[keep] = dec.step(torch.tensor([[7]]))
        if keep == 1.0:
            assert greedy_generate(model, ids, 6, stop_at_eos=False).tokens == want
    ref = LeanDecoder(dense, 48)
    ref.step(ids)
    dense_logits = ref.step(torch.tensor([[7]]))
    torch.testing.assert_close(logits[1.0], dense_logits, atol=2e-5, rtol=1e-5)  # every page kept: dense
    assert (logits[0.1] - dense_logits).abs().max() > 1e-3  # 1 of 10 pages: a different output


def test_fused_quest_counts_equal_the_python_step(monkeypatch):
    require_fast_step()
    model = _quest_model(refine=2.0)
    ids = prompt(2, 41)
    counts = []
    for disable in ("0", "1"):
        monkeypatch.setenv(fastpath.ENV, disable)
        reset_sparsity(model)
        dec = LeanDecoder(model, 60)
        assert (dec.fast is not None) == (disable == "0")
        dec.step(ids)
        for t in range(8):
            dec.step(torch.tensor([[3 + t]]))
        counts.append(list(attention_method(model).stats["decode"]))
    assert counts[0] == counts[1] and counts[0][0] < counts[0][1]
    assert 0.3 < measured_sparsity(model) < 0.8


def test_rewound_cache_drops_stale_page_bounds():
    """A second prompt written over the cache (the Python step, from position 0) must not reuse the
    first prompt's page bounds: the fused step then matches a fresh decoder on the second prompt."""
    require_fast_step()
    model = _quest_model(keep=0.2, dense_layers=0)
    a, b = prompt(8, 45), prompt(9, 41)
    dec = LeanDecoder(model, 60)
    dec.step(a)
    for t in range(4):
        dec.step(torch.tensor([[10 + t]]))
    dec.pos = 0  # rewind: the next prefill overwrites the cache
    got = [dec.step(b)]
    fresh = LeanDecoder(model, 60)
    fresh.fast = None  # the Python step's Quest
    want = [fresh.step(b)]
    for t in range(5):
        tok = torch.tensor([[20 + t]])
        got.append(dec.step(tok))
        want.append(fresh.step(tok))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_changed_or_removed_method_takes_the_python_step():
    require_fast_step()
    model = _quest_model()
    dec = LeanDecoder(model, 48)
    method = attention_method(model)
    assert dec.fast.runs(method)
    method.config.keep = 0.5  # changed after the step was built: the step's budget is stale
    assert not dec.fast.runs(method)
    remove(model)
    assert not dec.fast.runs(attention_method(model))
    assert LeanDecoder(model, 48).fast.method is None  # rebuilt: dense


def test_other_methods_are_not_fused():
    require_fast_step()
    from sparseland.attention import TidalDecodeConfig

    model = make_tiny_llama(layers=2, seed=3)
    sparsify_(model, TidalDecodeConfig(keep=0.25))
    dec = LeanDecoder(model, 32)
    assert dec.fast is None
    assert "TidalDecodeConfig" in fastpath.ineligible_reason(model, dec.k_cache)
