"""The int8 KV cache of the lean loop (``LeanDecoder(kv_dtype="int8")``): bytes, the quantizer, the
Python int8 step against the float one, the fused step against the Python int8 step, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder, dequantize_kv, greedy_generate, quantize_kv
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import prompt, require_fast_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cache_bytes_at_head_dim_64():
    model = make_tiny_llama(hidden=256, heads=4, kv_heads=2)  # head_dim 64
    L, KVH, T, D = 2, 2, 40, 64
    f32 = LeanDecoder(model, T).kv_cache_bytes()
    i8 = LeanDecoder(model, T, kv_dtype="int8")
    assert i8.head_dim == D
    assert i8.kv_cache_bytes() == 2 * L * KVH * T * (D + 4)  # codes + one float32 scale per vector, K and V
    assert f32 == 2 * L * KVH * T * D * 4
    assert i8.kv_cache_bytes() <= 0.3 * f32


def test_quantize_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g) * torch.logspace(-3, 2, 50).view(1, 50, 1)
    x[1, 7] = 0.0  # a zero vector
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 50)
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    assert float(scale[1, 7]) == 0.0 and not codes[1, 7].any()
    err = (dequantize_kv(codes, scale) - x).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-12).all())
    # round half to even, on exact halves (scale 1)
    c, s = quantize_kv(torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.4]]))
    assert float(s[0]) == 1.0 and c[0].tolist() == [127, 0, 2, 2, 0, -2, 3]


def _python(model, T, kv_dtype):
    dec = LeanDecoder(model, T, kv_dtype=kv_dtype)
    dec.fast = None  # the reference step
    return dec


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_python_int8_step_close_to_float(kv_heads):
    model = make_tiny_llama(hidden=128, heads=4, kv_heads=kv_heads)  # head_dim 32
    ids, steps = prompt(1, 24), 12
    f, q = _python(model, 24 + steps, "float32"), _python(model, 24 + steps, "int8")
    a, b = f.step(ids), q.step(ids)
    for _ in range(steps):  # the same (float32's greedy) tokens into both: logits close at every step
        assert float((b - a).norm() / a.norm()) < 2e-2
        tok = torch.tensor([[int(a.argmax())]])
        a, b = f.step(tok), q.step(tok)
    assert float((b - a).norm() / a.norm()) < 2e-2
    assert q.k_cache.dtype == torch.int8 and q.k_scale[:, :, : 24 + steps].gt(0).all()
    # free-running greedy tokens mostly equal
    ref = greedy_generate(model, ids, 16, stop_at_eos=False).tokens
    got = greedy_generate(model, ids, 16, stop_at_eos=False, kv_dtype="int8").tokens
    assert sum(x == y for x, y in zip(ref, got, strict=True)) >= 12


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("kv_heads", "hidden", "P"),
    [(2, 128, 9), (4, 128, 9), (2, 256, 21), (2, 64, 5), (4, 80, 3)],  # GQA / MHA; head_dim 32, 64, 16, 20
)
def test_fused_int8_step_matches_python_int8_step(kv_heads, hidden, P, threads):
    require_fast_step()
    model = make_tiny_llama(hidden=hidden, heads=4, kv_heads=kv_heads)
    steps = 10
    torch.set_num_threads(threads)  # the one_thread fixture restores it
    fast, ref = LeanDecoder(model, P + steps, kv_dtype="int8"), _python(model, P + steps, "int8")
    assert fast.fast is not None, fastpath.ineligible_reason(model, fast.k_cache)
    ids = prompt(2, P)
    a, b = fast.step(ids), ref.step(ids)  # both prefill with the Python step
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for _ in range(steps):
        tok = torch.tensor([[int(b.argmax())]])
        a, b = fast.step(tok), ref.step(tok)  # fused vs Python
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    diff = (fast.k_cache.int() - ref.k_cache.int()).abs(), (fast.v_cache.int() - ref.v_cache.int()).abs()
    for d in diff:  # the same quantization: codes equal up to a rare rounding flip of a near-half value
        assert int(d.max()) <= 1 and float(d.gt(0).float().mean()) < 1e-3
    torch.testing.assert_close(fast.k_scale, ref.k_scale, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fast.v_scale, ref.v_scale, atol=1e-7, rtol=1e-5)
    assert fast.k_scale[:, :, : P + steps].gt(0).all()  # the fused step wrote its positions


def test_fused_int8_greedy_equals_python_int8():
    require_fast_step()
    model = make_tiny_llama()
    ids = prompt(3, 8)
    fused = greedy_generate(model, ids, 10, stop_at_eos=False, kv_dtype="int8").tokens
    with fastpath.use(False):
        python = greedy_generate(model, ids, 10, stop_at_eos=False, kv_dtype="int8").tokens
    assert fused == python


def test_bad_kv_dtype_is_a_clear_error(tiny_llama):
    with pytest.raises(SparselandError, match=r"kv_dtype='fp8' is unknown; use one of \['float32', 'int8', 'sparse'\]"):
        LeanDecoder(tiny_llama, 8, kv_dtype="fp8")
    with pytest.raises(SparselandError, match="kv_dtype='bfloat16' is unknown"):
        greedy_generate(tiny_llama, prompt(0, 4), 2, kv_dtype="bfloat16")


def test_attention_methods_refuse_int8_naming_the_fix():
    from sparseland.api import sparsify_
    from sparseland.attention import H2OConfig, QuestConfig

    for config in (QuestConfig(keep=0.25, page_size=4), H2OConfig(keep=0.5)):
        model = make_tiny_llama()
        sparsify_(model, config)
        with pytest.raises(SparselandError, match="kv_dtype='float32'"):
            LeanDecoder(model, 16, kv_dtype="int8")
        LeanDecoder(model, 16)  # float32 still runs it


def test_fused_quest_refuses_an_int8_cache():
    require_fast_step()
    from sparseland.api import sparsify_
    from sparseland.attention import QuestConfig

    model = make_tiny_llama()
    sparsify_(model, QuestConfig(keep=0.25, page_size=4))
    codes = torch.zeros(2, 2, 16, 16, dtype=torch.int8)
    assert "float32 KV cache" in fastpath.ineligible_reason(model, codes)
    with pytest.raises(SparselandError, match="LeanDecoder"):
        fastpath.build_fast_step(make_tiny_llama(), codes, codes)


def test_cli_generate_and_longctx_kv_dtype(tmp_path, tiny_llama, capsys, monkeypatch):
    from sparseland.cli import main
    from sparseland.runtime.checkpoint import save_sparse_checkpoint
    from tests.data.test_longctx import StubTokenizer
    from tests.models.test_loader import _word_tokenizer

    ck = save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "ck", metadata={})
    args = ["generate", "--model", str(ck), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--json"]
    assert main([*args, "--kv-dtype", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_dtype"] == "int8" and out["new_tokens"] == 4

    import sparseland.models

    monkeypatch.setattr(sparseland.models, "load_model", lambda name: (make_tiny_llama(max_pos=1024), StubTokenizer()))
    argv = ["longctx", "--length", "512", "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "3"]
    assert main([*argv, "--kv-dtype", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_dtype"] == "int8"
    assert main([*argv, "--kv-dtype", "int8", "--method", "quest", "--sparsity", "0.5"]) == 2
    assert "--kv-dtype float32" in capsys.readouterr().err
