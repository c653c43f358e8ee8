"""Gemma 3 270M, the second known model (the optional extra ``gemma``): loaded offline, and its lean
loop on the fused C++ step equal to transformers' ``generate``, sliding window of 512 included."""

from __future__ import annotations

import json

import pytest
import torch

from sparseland.models.arch import describe
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder, greedy_generate

pytestmark = pytest.mark.slow

WINDOW = 512


@pytest.fixture(scope="module")
def gemma():
    from sparseland.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def long_ids(gemma):
    """A prompt of the evaluation text longer than the sliding window (so the window matters)."""
    from sparseland.data import load_corpus

    _, tok = gemma
    ids = load_corpus(tok).evaluation(WINDOW + 87, max_windows=1)[0]  # (T,)
    return torch.cat([torch.tensor([tok.bos_token_id]), ids]).reshape(1, -1)  # (1, 600)


def test_gemma_loads_with_its_layout(gemma):
    model, tok = gemma
    arch = describe(model)
    assert (arch.model_type, len(arch.blocks), arch.hidden, arch.n_heads, arch.n_kv) == ("gemma3_text", 18, 640, 4, 1)
    assert next(model.parameters()).dtype == torch.float32
    assert arch.family.placement == "sandwich" and arch.family.qk_norm == "head"
    assert list(arch.windows) == [None if (i + 1) % 6 == 0 else WINDOW for i in range(18)]  # 5 of every 6
    assert model.config.vocab_size == 262144 and arch.tied_embeddings
    assert tok("hello")["input_ids"][0] == tok.bos_token_id  # a base model: BOS first


def test_greedy_tokens_equal_generate_on_the_fused_step(gemma):
    model, tok = gemma
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    res = greedy_generate(model, ids, max_new_tokens=16, stop_at_eos=False)
    assert (res.path, res.path_reason) == ("fused", None)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    assert res.tokens == want


def _decode(model, ids: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor], LeanDecoder]:
    dec = LeanDecoder(model, ids.shape[1] + n)
    logits = [dec.step(ids)]
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits.append(dec.step(torch.tensor([[tokens[-1]]])))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits, dec


def test_sliding_window_is_honoured_past_512(gemma, long_ids):
    """A 600-token prompt: the fused step's decode logits equal transformers' (which attends the last
    512 positions on the sliding layers); the same decoder without the window gives other logits."""
    model, _ = gemma
    n = 6
    tokens, logits, dec = _decode(model, long_ids, n)
    assert dec.fused_steps == n - 1, dec.fast_reason
    with torch.inference_mode():
        out = model.generate(
            long_ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert tokens == out.sequences[0, long_ids.shape[1] :].tolist()
    want = torch.stack([x[0] for x in out.logits])
    got = torch.stack(logits)
    err = float((got - want).abs().max())
    assert err < 1e-4 * float(want.abs().max()), err  # measured: 2.7e-5 of a max |logit| of 29
    saved = model.config.sliding_window
    model.config.sliding_window = None  # every layer global: what ignoring the window would compute
    try:
        assert all(w is None for w in describe(model).windows)
        _, unwindowed, dec2 = _decode(model, long_ids, n)
        assert dec2.fused_steps == n - 1
    finally:
        model.config.sliding_window = saved
    assert float((torch.stack(unwindowed) - want).abs().max()) > 10 * err + 1e-3


def test_generate_json_reports_the_fused_path(gemma, capsys):
    from sparseland.cli import main

    assert fastpath.ineligible_reason(gemma[0], torch.zeros(1)) is None
    args = ["generate", "--model", "gemma3-270m", "--prompt", "def f(x):", "--raw", "--max-new-tokens", "4"]
    code = main([*args, "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "fused" and out["path_reason"] is None
