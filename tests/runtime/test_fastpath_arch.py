"""The fused decode step on the layouts beyond Llama (Gemma 2/3, Phi-3, OLMo 2, GPT-NeoX) in every weight kind,
the int8 cache and threading; its state safety (activation sparsity changed or removed after it was
built, two threads); and the named per-layer arguments of ``DecodeStep.add_layer``."""

from __future__ import annotations

import threading

import pytest
import torch

import sparseland as sl
from sparseland.activations import TEALConfig
from sparseland.activations import remove as remove_activations
from sparseland.activations.sites import get_state
from sparseland.api import sparsify_
from sparseland.models.arch import describe
from sparseland.quant import QuantConfig
from sparseland.runtime import fastpack, fastpath
from sparseland.runtime.generate import LeanDecoder
from sparseland.runtime.modules import to_sparse_runtime_
from tests.conftest import make_tiny_llama
from tests.models.arch_configs import make_tiny
from tests.runtime.helpers import (
    compare_fast_and_python,
    fused_tracks_python,
    magnitude_prune_,
    prompt,
    require_fast_step,
)

NEW = ("gemma2", "gemma3", "phi3", "olmo2", "gpt_neox")


@pytest.fixture(autouse=True)
def _needs_step():
    require_fast_step()


def _variant(family: str, fmt: str | None):
    model = make_tiny(family, seed=1)
    if fmt in ("bitmask", "2:4"):
        magnitude_prune_(model, 0.5, "2:4" if fmt == "2:4" else None)
        to_sparse_runtime_(model, format=fmt, value_dtype="float32")
    elif fmt == "bf16":
        to_sparse_runtime_(model, format="dense", value_dtype="bfloat16")
    return model


@pytest.mark.parametrize("fmt", [None, "bitmask", "2:4", "bf16"])
@pytest.mark.parametrize("family", NEW)
def test_new_layouts_fused_equal_python(family, fmt):
    """Prompt of 10 > the window of 8: the window, soft-capping, sandwich / post norms, (1 + w) norms,
    GELU-tanh and the fused qkv / gate_up views all matter."""
    compare_fast_and_python(_variant(family, fmt), steps=6, prompt_len=10, atol=1e-4)


@pytest.mark.parametrize("mode", ["region", "per_matvec"])
@pytest.mark.parametrize("family", ["gemma3", "olmo2", "phi3", "gpt_neox"])
def test_new_layouts_two_threads(family, mode):
    compare_fast_and_python(_variant(family, "bitmask"), steps=5, prompt_len=10, mode=mode, threads=2, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "gpt_neox"])
def test_quantized_new_layouts(family):
    """q4 on the fused qkv / gate_up views (Phi-3) and the Gemma layout: within the int8 x-rounding
    error of the Python step over the same kernels (test_fastpath_quant.py says why not exact)."""
    model = make_tiny(family, seed=2)
    sl.sparsify_(model, QuantConfig(scheme="int4-g32"))
    to_sparse_runtime_(model)
    fast, _ = fused_tracks_python(model, prompt_len=10)
    assert fast.fused_steps == 5


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt_neox"])
def test_int8_cache_with_window_and_softcap(family):
    model = make_tiny(family, seed=3)
    fast, ref = LeanDecoder(model, 16, kv_dtype="int8"), LeanDecoder(model, 16, kv_dtype="int8")
    assert fast.fast is not None, fast.fast_reason
    ref.fast = None
    a, b = fast.step(prompt(1, 10)), ref.step(prompt(1, 10))
    for _ in range(5):
        tok = torch.tensor([[int(b.argmax())]])
        a, b = fast.step(tok), ref.step(tok)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert fast.fused_steps == 5
    torch.testing.assert_close(fast.k_cache, ref.k_cache, atol=1, rtol=0)  # codes: at most one step apart


@pytest.mark.parametrize("family", ["gemma3", "olmo2"])
def test_teal_on_new_layouts(family):
    """TEAL's input and gate_act sites (GELU-tanh gate on Gemma) in the fused step."""
    model = make_tiny(family, seed=4)
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=torch.randint(3, 256, (4, 32)))
    to_sparse_runtime_(model)
    compare_fast_and_python(model, steps=5, prompt_len=10, atol=1e-4)


def _neox(parallel: bool, act: str, rotary: float, seed: int = 0):
    """A tiny GPT-NeoX (per-head fused qkv, LayerNorms with biases, non-gated MLP, biases everywhere)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=512,
        rotary_pct=rotary,
        use_parallel_residual=parallel,
        hidden_act=act,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPTNeoXForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("parallel", "act", "rotary"), [(True, "gelu", 0.25), (False, "gelu", 0.5), (False, "gelu_new", 1.0)]
)
def test_gpt_neox_variants_fused_equal_python(parallel, act, rotary):
    """Parallel and sequential residual, exact and tanh GELU, a quarter, half and full rotary: the fused
    step's logits equal the Python step's (which equals transformers' forward, test_arch_matrix.py)."""
    model = _neox(parallel, act, rotary, seed=11)
    assert describe(model).rotary_dim == int(16 * rotary)
    compare_fast_and_python(model, steps=6, prompt_len=10, atol=1e-4)
    compare_fast_and_python(model, steps=4, prompt_len=10, mode="region", threads=2, atol=1e-4)


def test_what_stays_off_the_fused_step_says_why():
    assert fastpath.ineligible_reason(make_tiny("qwen2_moe"), torch.zeros(1)) is None  # MoE: test_fastpath_moe.py
    neox = make_tiny("gpt_neox")
    sparsify_(neox, TEALConfig(sparsity=0.4), calibration=torch.randint(3, 256, (4, 32)))
    assert "Python step only" in fastpath.ineligible_reason(neox, torch.zeros(1))  # TEAL on a non-gated MLP
    to_sparse_runtime_(neox)
    assert "fused and activation-sparse" in fastpath.ineligible_reason(neox, torch.zeros(1))
    model = make_tiny("phi3")
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=torch.randint(3, 256, (4, 32)))
    to_sparse_runtime_(model)
    assert "fused" in fastpath.ineligible_reason(model, torch.zeros(1))


def _teal_llama(seed: int = 5):
    model = make_tiny_llama(hidden=64, intermediate=128, heads=4, kv_heads=2, seed=seed)
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=torch.randint(3, 256, (4, 32)))
    to_sparse_runtime_(model)
    return model


def _lockstep(fast: LeanDecoder, ref: LeanDecoder, tokens: list[int]) -> None:
    for t in tokens:
        a, b = fast.step(torch.tensor([[t]])), ref.step(torch.tensor([[t]]))
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_kept_decoder_stops_sparsifying_after_remove():
    """issue 17: a kept LeanDecoder must follow activations.remove() (and changed thresholds), not keep
    the thresholds its fused step copied."""
    model = _teal_llama()
    fast, ref = LeanDecoder(model, 16), LeanDecoder(model, 16)
    assert fast.fast is not None, fast.fast_reason
    ref.fast = None  # the Python step: always the model's current hooks
    fast.step(prompt(2, 4)), ref.step(prompt(2, 4))
    _lockstep(fast, ref, [5, 6])
    assert fast.fused_steps == 2
    state = get_state(model)
    with torch.no_grad():
        for site in state.sites:
            site.threshold.mul_(2.0)  # in place: the step's copy is stale
    _lockstep(fast, ref, [7, 8])
    assert fast.fused_steps == 4 and fast.fast is not None  # re-packed with the new thresholds
    remove_activations(model)
    _lockstep(fast, ref, [9, 10])  # dense inputs now, in both
    assert fast.fast is None and "no activation sparsity installed" in fast.fast_reason


def test_two_decoders_concurrently_equal_serial():
    """issue 17: two decoders (two models) decoding at once in two threads give the serial results."""
    models = [_teal_llama(6), make_tiny("gemma3", seed=7)]

    def run(model, out: list) -> None:
        dec = LeanDecoder(model, 40)
        logits = dec.step(prompt(3, 6))
        for _ in range(30):
            out.append(logits)
            logits = dec.step(logits.argmax().view(1, 1))
        assert dec.fused_steps == 30

    serial = [[], []]
    for m, out in zip(models, serial, strict=True):
        run(m, out)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both = [[], []]
        threads = [threading.Thread(target=run, args=(m, out)) for m, out in zip(models, both, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(old)
    for got, want in zip(both, serial, strict=True):
        assert len(got) == len(want) == 30
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_step_shared_by_two_threads():
    """One DecodeStep called from two threads at once (its scratch is shared): a mutex serializes the
    calls, so every result equals the serial one."""
    model = make_tiny("olmo2", seed=8)
    dec = LeanDecoder(model, 16)
    dec.step(prompt(4, 6))
    h = torch.randn(1, 1, model.config.hidden_size)
    pos_ids = torch.tensor([[dec.pos]])
    cos, sin = dec._rotary(h, pos_ids)[describe(model).layer_types[0]]
    want = dec.fast(h, cos, sin, dec.pos)  # writes the same k, v at pos every call
    results: list[torch.Tensor] = []

    def run() -> None:
        for _ in range(25):
            results.append(dec.fast(h, cos, sin, dec.pos))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50
    for r in results:
        torch.testing.assert_close(r, want, atol=0, rtol=0)


def test_add_layer_names_are_checked():
    model = make_tiny("gemma3", seed=9)
    arch = describe(model)
    tensors, ints, floats = fastpack.pack_layer(arch, 0, {}, {}, ["sliding_attention", "full_attention"])
    cache = torch.zeros(1, arch.n_kv, 8, arch.head_dim)
    args = (arch.hidden, fastpack.intermediate(arch), arch.n_heads, arch.n_kv, arch.head_dim, 0.25, cache, cache)

    def add(t, i, f):
        torch.classes.sparseland.DecodeStep(*args).add_layer(t, i, f)

    add(tensors, ints, floats)  # the packed layer as it is
    with pytest.raises(RuntimeError, match="unknown names 'q.wieght'"):
        add(tensors | {"q.wieght": tensors["q.w"]}, ints, floats)
    with pytest.raises(RuntimeError, match="needs tensor 'down.w'"):
        add({k: v for k, v in tensors.items() if k != "down.w"}, ints, floats)
    with pytest.raises(RuntimeError, match="attn_in must be contiguous float32 with 64"):
        add(tensors | {"attn_in": torch.ones(3)}, ints, floats)
    with pytest.raises(RuntimeError, match="window >= 0"):
        add(tensors, ints | {"window": -1}, floats)
