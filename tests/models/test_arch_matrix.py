"""Every family ``sparseland.models.arch`` knows, as a tiny random model, through every family of
methods: weight pruning (Wanda 50%, SparseGPT 2:4), TEAL, Quest and a prefill pattern, and the runtime
(the lean loop's greedy tokens and logits against transformers, the fused step against the Python step)."""

from __future__ import annotations

import pytest
import torch

from sparseland.activations import TEALConfig, measure_sparsity
from sparseland.activations import remove as remove_activations
from sparseland.api import sparsify_
from sparseland.attention import make_config, measured_sparsity
from sparseland.attention import remove as remove_attention
from sparseland.errors import SparselandError
from sparseland.models.arch import describe
from sparseland.runtime import fastpath
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import to_sparse_runtime_
from sparseland.weights import SparseGPTConfig, WandaConfig
from tests.models.arch_configs import DENSE, FAMILIES, VOCAB, make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
FUSED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox")  # dense: fused
T = 24  # prompt tokens: longer than the sliding window (8), so the window mask matters
NEW = 8


def _ids(seed: int = 0, n: int = T) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _calib() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


def _hf_greedy(model, ids, n=NEW) -> list[int]:
    """transformers' greedy tokens, stopping at EOS as ``greedy_generate`` does."""
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        models[family] = make_tiny(family)
    return models[family]


def _check_lean_logits(model, seq: torch.Tensor, prompt: int = T) -> None:
    """The lean loop's logits (prefill, then token by token) equal the model's own forward."""
    with torch.no_grad():
        want = model(seq).logits[0]  # (n, V)
    dec = LeanDecoder(model, seq.shape[1])
    torch.testing.assert_close(dec.step(seq[:, :prompt]), want[prompt - 1], atol=1e-4, rtol=1e-4)
    for t in range(prompt, seq.shape[1]):
        torch.testing.assert_close(dec.step(seq[:, t : t + 1]), want[t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_loop_equals_transformers(models, family):
    model = _model(models, family)
    _check_lean_logits(model, _ids(0, T + NEW))
    ids = _ids(2)
    assert greedy_generate(model, ids, NEW).tokens == _hf_greedy(model, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_names_the_layout(models, family):
    arch = describe(_model(models, family))
    facts = arch.summary()
    assert len(arch.blocks) == 3 and arch.n_heads == 4
    expect = {
        "phi3": {"qkv": "concat", "mlp": "gated_fused"},
        "gpt_neox": {"qkv": "per_head", "mlp": "plain", "parallel_residual": True, "rotary_dim": 8},
        "gemma2": {"norms": "sandwich", "attn_softcap": 5.0, "final_softcap": 3.0, "tied_embeddings": True},
        "gemma3": {"norms": "sandwich", "qk_norm": "head"},
        "olmo2": {"norms": "post", "qk_norm": "all"},
        "qwen2": {"biases": ["q", "k", "v"]},
        "qwen3": {"qk_norm": "head", "biases": []},
        "mistral": {"sliding_window_layers": 3},
        "mixtral": {"mlp": "moe", "experts": 4},
        "qwen2_moe": {"mlp": "moe", "experts": 4},
        "llama": {"qkv": "separate", "mlp": "gated", "norms": "pre", "biases": []},
    }[family]
    assert {k: facts[k] for k in expect} == expect
    # every projection role the layer names is a Linear of the right width
    for _, mod in arch.linears(0).values():
        assert isinstance(mod, torch.nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", ["wanda50", "sparsegpt24"])
def test_pruning_then_runtime(family, config):
    model = make_tiny(family)
    cfg = WandaConfig(sparsity=0.5) if config == "wanda50" else SparseGPTConfig(sparsity=0.5, pattern="2:4")
    report = sparsify_(model, cfg, calibration=_calib())
    arch = describe(model)
    routers = arch.router_names()
    pruned = [m for i in range(len(arch.blocks)) for n, m in arch.linears(i).values() if n not in routers]
    for name in routers:  # MoE routers stay dense
        w = arch.blocks[0].get_submodule(name).weight
        assert (w != 0).all()
    zeros = sum(int((m.weight == 0).sum()) for m in pruned)
    assert zeros / sum(m.weight.numel() for m in pruned) == pytest.approx(0.5, abs=0.01)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    if config == "sparsegpt24":
        for m in pruned:
            groups = (m.weight != 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
            assert (groups <= 2).all()
    if arch.moe is not None:  # every expert pruned from the tokens routed to it
        for i in range(len(arch.blocks)):
            experts = arch.blocks[i].get_submodule(arch.moe.experts)
            for W in (experts.gate_up_proj, experts.down_proj):
                assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
                if config == "sparsegpt24":
                    assert ((W != 0).reshape(*W.shape[:2], -1, 4).sum(-1) <= 2).all()
        assert any(".experts.gate_up_proj." in n for n in report.layer_sparsity)
    ids = _ids(3)
    want = _hf_greedy(model, ids)
    to_sparse_runtime_(model)
    assert greedy_generate(model, ids, NEW).tokens == want


@pytest.mark.parametrize("family", FAMILIES)
def test_teal(models, family):
    model = _model(models, family)
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=_calib())
    try:
        frac = measure_sparsity(model, _calib())
        assert frac and all(0.2 < v < 0.6 for v in frac.values())
        _check_lean_logits(model, _ids(4, T + 4))
    finally:
        remove_activations(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["quest", "streaming"])
def test_sparse_attention(models, family, method):
    model = _model(models, family)
    kw = {"dense_layers": 0, "page_size": 4} if method == "quest" else {"block_size": 4, "sink": 4}
    sparsify_(model, make_config(method, 0.6, **kw))
    try:
        ids = _ids(5, 40)
        want = _hf_greedy(model, ids, 4)
        got = greedy_generate(model, ids, 4).tokens
        assert got == want
        arch = describe(model)
        if arch.attn_softcap is None and any(w is None for w in arch.windows):
            assert measured_sparsity(model) > 0.1  # the method skipped work on the full-attention layers
    finally:
        remove_attention(model)


@pytest.mark.parametrize("family", DENSE)
def test_fused_step_equals_python_or_says_why(models, family):
    model = _model(models, family)
    seq = _ids(6, T + 4)
    with fastpath.use(enabled=True):
        dec = LeanDecoder(model, seq.shape[1])
        fused = [dec.step(seq[:, :T])] + [dec.step(seq[:, t : t + 1]) for t in range(T, seq.shape[1])]
    if not fastpath.available():
        assert dec.path == "python" and "not built" in dec.fast_reason
        return
    assert fastpath.extras_supported()  # the extension is built from this checkout: it takes layers by name
    if family in FUSED:
        assert dec.path == "fused" and dec.fast_reason is None
    else:
        assert dec.path == "python" and dec.fast_reason  # one clear reason
        return
    with fastpath.use(enabled=False):
        ref = LeanDecoder(model, seq.shape[1])
        python = [ref.step(seq[:, :T])] + [ref.step(seq[:, t : t + 1]) for t in range(T, seq.shape[1])]
    for a, b in zip(fused, python, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sliding_window_runs_fused(models):
    """Mistral's window (8) in the fused step: a window as long as the cache, and one shorter (10
    positions > 8), both with transformers' greedy tokens."""
    if not fastpath.available():
        pytest.skip("the C++ extension is not built")
    model = _model(models, "mistral")
    ids = _ids(7, 4)
    for n in (4, 6):
        res = greedy_generate(model, ids, n, stop_at_eos=False)
        assert res.path == "fused" and res.tokens == _hf_greedy(model, ids, n)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


@pytest.mark.parametrize(
    "entry",
    ["describe", "generate", "wanda", "teal", "quest", "fused"],
)
def test_unknown_architecture_is_one_clear_error(entry):
    model = _gpt2()
    ids = _ids(0, 8)
    calls = {
        "describe": lambda: describe(model),
        "generate": lambda: greedy_generate(model, ids, 2),
        "wanda": lambda: sparsify_(model, WandaConfig(sparsity=0.5), calibration=_calib()),
        "teal": lambda: sparsify_(model, TEALConfig(sparsity=0.4), calibration=_calib()),
        "quest": lambda: sparsify_(model, make_config("quest", 0.5)),
    }
    if entry == "fused":
        reason = fastpath.ineligible_reason(model, torch.zeros(1))
        assert reason and ("GPT2LMHeadModel" in reason or "not built" in reason)
        return
    with pytest.raises(SparselandError, match="GPT2LMHeadModel|Llama|projections") as e:
        calls[entry]()
    if entry in ("describe", "generate", "quest"):
        assert "gpt2" in str(e.value) and "not supported" in str(e.value)
