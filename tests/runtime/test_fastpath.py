"""The fused C++ decode step (fastpath.py, csrc/decode_step.cpp) against the lean loop's Python step."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.activations import TEALConfig
from sparseland.api import sparsify_
from sparseland.errors import SparselandError
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.kernels import force_reference
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import compare_fast_and_python as _compare
from tests.runtime.helpers import magnitude_prune_
from tests.runtime.helpers import prompt as _prompt
from tests.runtime.helpers import require_fast_step as _require_extension


def _variant(model, fmt: str | None, value_dtype: str = "float32", pattern: str | None = None, sparsity=0.5):
    if pattern or fmt == "bitmask":
        magnitude_prune_(model, sparsity, pattern)
    if fmt is not None:
        to_sparse_runtime_(model, format=fmt, value_dtype=value_dtype)
    return model


VARIANTS = [
    ("torch_linear_fp32", None, "float32", None),
    ("dense_fp32", "dense", "float32", None),
    ("dense_bf16", "dense", "bfloat16", None),
    ("bitmask50_fp32", "bitmask", "float32", None),
    ("bitmask50_bf16", "bitmask", "bfloat16", None),
    ("2:4_fp32", "2:4", "float32", "2:4"),
    ("2:4_bf16", "2:4", "bfloat16", "2:4"),
    ("4:8_fp32", "4:8", "float32", "4:8"),
]


@pytest.mark.parametrize("name,fmt,dtype,pattern", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("kv_heads", [2, 6], ids=["gqa", "mha"])
def test_fast_step_matches_python_step(name, fmt, dtype, pattern, kv_heads):
    model = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=kv_heads, seed=3)
    _compare(_variant(model, fmt, dtype, pattern), steps=6)


@pytest.mark.parametrize("mode", ["region", "per_matvec"])
def test_two_threads_both_modes(mode):
    model = _variant(make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=4), "bitmask")
    _compare(model, steps=5, mode=mode, threads=2)


@settings(max_examples=12, deadline=None)
@given(
    head_dim=st.sampled_from([4, 10, 16]),
    heads_kv=st.sampled_from([(4, 1), (4, 2), (3, 3), (6, 2)]),
    inter=st.sampled_from([36, 100, 128]),
    fmt=st.sampled_from(["dense", "bitmask", "2:4", None]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    layers=st.integers(1, 3),
    prompt_len=st.integers(1, 9),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
)
def test_property_fast_equals_python(head_dim, heads_kv, inter, fmt, dtype, layers, prompt_len, threads, seed):
    heads, kv = heads_kv
    hidden = heads * head_dim  # includes widths that are not multiples of 8 (padding paths)
    if fmt == "2:4" and hidden % 4:
        fmt = "bitmask"
    model = make_tiny_llama(layers=layers, hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, seed=seed)
    model = _variant(model, fmt, dtype, "2:4" if fmt == "2:4" else None, sparsity=0.6)
    _compare(model, steps=4, prompt_len=prompt_len, threads=threads, seed=seed)


def test_greedy_tokens_equal_hf_generate_on_the_fast_path():
    _require_extension()
    model = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=5)
    ids = _prompt(2, 9)
    out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    want = out[0, 9:].tolist()
    assert LeanDecoder(model, 30).fast is not None
    assert greedy_generate(model, ids, 16, stop_at_eos=False).tokens == want
    with force_reference():
        assert greedy_generate(model, ids, 16, stop_at_eos=False).tokens == want


# ----- falling back ------------------------------------------------------------------------------


def _eligible(model) -> bool:
    return LeanDecoder(model, 8).fast is not None


def test_ineligible_models_fall_back():
    _require_extension()
    base = lambda: make_tiny_llama(seed=6)  # noqa: E731
    assert _eligible(base())

    m = base()
    m.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert not _eligible(m)

    m = base()
    m.model.layers[0].self_attn._sparseland_attention = object()
    assert not _eligible(m)

    m = base()
    attn = m.model.layers[0].self_attn
    attn.o_proj = torch.nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=True)
    torch.nn.init.normal_(attn.o_proj.bias)
    assert _eligible(m)  # an o bias (GPT-NeoX) runs fused: the row kernels add it
    _compare(m, steps=3)
    m.model.layers[0].mlp.gate_proj.bias = torch.nn.Parameter(torch.ones(m.config.intermediate_size))
    assert not _eligible(m)  # a gate bias does not

    m = base()
    attn = m.model.layers[0].self_attn
    attn.q_proj = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=True)
    assert _eligible(m)  # a q/k/v bias (Qwen2) runs fused: DecodeStep.set_layer_extras

    m = base()
    m.model.layers[0].mlp.act_fn = torch.nn.ReLU()
    assert not _eligible(m)

    m = base()
    m.model.layers[0].mlp.act_fn = torch.nn.GELU(approximate="tanh")
    _compare(m, steps=3)  # torch's GELU module runs fused, exact or tanh, each as itself
    m.model.layers[0].mlp.act_fn = torch.nn.GELU()
    _compare(m, steps=3)

    m = base()
    m.model.layers[1].self_attn.q_norm = torch.nn.Identity()
    assert _eligible(m)  # Llama's forward never calls a q_norm: the architecture layer, not attributes, decides

    m = base()
    to_sparse_runtime_(m, format="actsparse")
    assert isinstance(m.model.layers[0].mlp.down_proj, SparseLinear)
    assert not _eligible(m)

    m = base()
    sparsify_(m, TEALConfig(sparsity=0.5), calibration=torch.randint(0, 256, (2, 16)))
    assert not _eligible(m)
    ids = _prompt(3)
    # the fallback still generates, and equals the hooked model's own greedy output
    want = m.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)[0, 7:].tolist()
    assert greedy_generate(m, ids, 5, stop_at_eos=False).tokens == want


def test_switches_disable_the_fast_path(monkeypatch):
    _require_extension()
    model = make_tiny_llama(seed=7)
    with force_reference():
        assert LeanDecoder(model, 8).fast is None
    monkeypatch.setenv(fastpath.ENV, "1")
    assert LeanDecoder(model, 8).fast is None
    monkeypatch.delenv(fastpath.ENV)
    dec = LeanDecoder(model, 8)
    assert dec.fast is not None

    class Boom:  # a fast step that must not run
        def runs(self, method):
            return method is None

        def invalidate(self, pos):
            pass

        def __call__(self, *args):
            raise AssertionError("fast step ran while disabled")

    dec.fast = Boom()
    dec.step(_prompt(4, 3))
    with force_reference():
        dec.step(torch.tensor([[5]]))  # switched off after the decoder was built
    monkeypatch.setenv(fastpath.ENV, "1")
    dec.step(torch.tensor([[6]]))


def test_bad_arguments_raise_clear_errors():
    _require_extension()
    model = make_tiny_llama(seed=8)
    dec = LeanDecoder(model, 4)
    with pytest.raises(SparselandError, match="mode"):
        dec.fast.mode = "fastest"
    with pytest.raises(SparselandError, match="k_cache"):
        fastpath.build_fast_step(model)
    h = torch.zeros(1, 1, model.config.hidden_size)
    cs = torch.ones(model.config.hidden_size // model.config.num_attention_heads)
    with pytest.raises(RuntimeError, match="outside the cache"):
        dec.fast(h, cs, cs, 4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,dtype", [(None, "float32"), ("bitmask", "bfloat16"), ("2:4", "float32")])
def test_real_model_fast_tokens_match(embedded, fmt, dtype, monkeypatch):
    import copy

    model, tok = embedded
    model = copy.deepcopy(model)
    model = _variant(model, fmt, dtype, "2:4" if fmt == "2:4" else None)
    ids = tok("The Python language reference describes", return_tensors="pt")["input_ids"]
    assert LeanDecoder(model, 8).fast is not None
    fast = greedy_generate(model, ids, 24, stop_at_eos=False).tokens
    monkeypatch.setenv(fastpath.ENV, "1")  # the Python step over the same C++ kernels
    assert greedy_generate(model, ids, 24, stop_at_eos=False).tokens == fast
    if fmt is None:
        out = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0)
        assert fast == out[0, ids.shape[1] :].tolist()


def test_use_switches_and_restores(monkeypatch):
    monkeypatch.delenv(fastpath.ENV, raising=False)
    monkeypatch.setenv(fastpath.MODE_ENV, "per_matvec")
    before = fastpath.enabled()
    with fastpath.use(enabled=False, mode="region"):
        assert not fastpath.enabled() and os.environ[fastpath.MODE_ENV] == "region"
    assert fastpath.enabled() == before and fastpath.ENV not in os.environ
    assert os.environ[fastpath.MODE_ENV] == "per_matvec"
