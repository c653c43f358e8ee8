import pytest
import torch

from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import SparseLinear, model_bytes, to_sparse_runtime_, weight_bytes
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import magnitude_prune_


def _hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _prompt(seed=0, T=9, vocab=256):
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def test_lean_loop_matches_hf_generate(tiny_llama):
    ids = _prompt()
    want = _hf_greedy(tiny_llama, ids, 20)
    got = greedy_generate(tiny_llama, ids, 20, stop_at_eos=False)
    assert got.tokens == want
    assert got.prompt_tokens == 9 and len(got.per_token_seconds) == 19


def test_lean_loop_logits_match_forward(tiny_llama):
    ids = _prompt(1, 12)
    full = tiny_llama(ids).logits[0]  # (T, V)
    dec = LeanDecoder(tiny_llama, 12)
    torch.testing.assert_close(dec.step(ids[:, :5]), full[4], atol=1e-5, rtol=1e-5)
    for t in range(5, 12):
        torch.testing.assert_close(dec.step(ids[:, t : t + 1]), full[t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "fmt,pattern,value_dtype",
    [("auto", None, "float32"), ("2:4", "2:4", "float32"), ("bitmask", None, "bfloat16")],
)
def test_sparse_runtime_matches_pruned_model(fmt, pattern, value_dtype):
    model = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=3)
    magnitude_prune_(model, 0.5, pattern)
    if value_dtype == "bfloat16":  # the reference model sees the same rounded weights
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
                m.weight.data = m.weight.data.bfloat16().float()
    ids = _prompt(2)
    want = _hf_greedy(model, ids, 12)
    dense_bytes = weight_bytes(model)
    rep = to_sparse_runtime_(model, format=fmt, value_dtype=value_dtype)
    assert rep.replaced == 14 and rep.ratio < 0.6
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    assert weight_bytes(model) < dense_bytes
    assert greedy_generate(model, ids, 12, stop_at_eos=False).tokens == want
    # long prefill goes through the dense fallback and must agree too
    long_ids = _prompt(3, 40)
    torch.testing.assert_close(LeanDecoder(model, 40).step(long_ids), model(long_ids).logits[0, -1])


def test_lm_head_dtype_and_bytes(tiny_llama):
    before = model_bytes(tiny_llama)
    to_sparse_runtime_(tiny_llama, format="dense", lm_head_dtype="float32")
    assert isinstance(tiny_llama.lm_head, SparseLinear)
    assert model_bytes(tiny_llama) == before  # fp32 lm_head shares the embedding's storage
    ids = _prompt()
    assert len(greedy_generate(tiny_llama, ids, 5, stop_at_eos=False).tokens) == 5


@pytest.mark.slow
def test_real_model_greedy_matches(embedded):
    model, tok = embedded
    ids = tok("The Python language reference describes", return_tensors="pt")["input_ids"]
    want = _hf_greedy(model, ids, 20)
    assert greedy_generate(model, ids, 20, stop_at_eos=False).tokens == want


@pytest.mark.slow
def test_real_model_sparse_runtime_matches_pruned_generate(embedded):
    import copy

    model, tok = embedded
    model = copy.deepcopy(model)
    magnitude_prune_(model, 0.5)
    ids = tok("Python is a programming language that", return_tensors="pt")["input_ids"]
    want = _hf_greedy(model, ids, 20)
    rep = to_sparse_runtime_(model, format="bitmask", lm_head_dtype="float32")
    assert rep.replaced == 210 and rep.ratio < 0.55
    assert greedy_generate(model, ids, 20, stop_at_eos=False).tokens == want
