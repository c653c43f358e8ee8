"""MoE blocks on the fused decode step (csrc/decode_moe.cpp): Mixtral (softmax, top-k, renormalized) and
Qwen2-MoE (with and without its sigmoid-gated shared expert, norm_topk_prob on and off), the experts as
transformers' 3-D weights or as ``ExpertList`` in every weight kind, one and two threads: the fused
step's logits equal the Python step's (which runs the model's own MoE block)."""

from __future__ import annotations

import pytest
import torch

from sparseland.activations import TEALConfig
from sparseland.api import sparsify_
from sparseland.runtime import fastpack_moe, fastpath
from sparseland.runtime.experts import ExpertList, experts_to_sparse_runtime_
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import to_sparse_runtime_
from tests.models.arch_configs import make_tiny
from tests.runtime.helpers import (
    compare_fast_and_python,
    fused_tracks_python,
    magnitude_prune_,
    prompt,
    require_fast_step,
)


@pytest.fixture(autouse=True)
def _needs_step():
    require_fast_step()


def _qwen(shared: bool = True, norm_topk: bool = False, seed: int = 0):
    """A tiny Qwen2-MoE: 6 experts, top-2 (top-3 without the shared expert), routing per ``norm_topk``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=48 if shared else 0,
        num_experts=6, num_experts_per_tok=2 if shared else 3, norm_topk_prob=norm_topk, pad_token_id=0,
    )  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(cfg).float().eval()


def _prune_experts_(model, pattern: str | None) -> None:
    """Magnitude-prune every expert matrix of the 3-D weights (50%, or N:M along the input)."""
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for w3 in (ex.gate_up_proj, ex.down_proj):
                for w in w3:
                    if pattern:
                        g = w.view(w.shape[0], -1, 4)
                        g.scatter_(-1, g.abs().topk(2, dim=-1, largest=False).indices, 0.0)
                    else:
                        w.view(-1)[w.abs().view(-1).topk(w.numel() // 2, largest=False).indices] = 0.0


def _variant(model, fmt: str | None):
    """The model with its experts in ``fmt`` (None: transformers' 3-D fp32 weights), the other Linears too."""
    if fmt in ("bitmask", "2:4"):
        magnitude_prune_(model, 0.5, "2:4" if fmt == "2:4" else None)
        _prune_experts_(model, fmt if fmt == "2:4" else None)
    if fmt is None:
        return model
    fmt_, vdt = {"bf16": ("dense", "bfloat16")}.get(fmt, (fmt, "float32"))
    nonempty = lambda m, n: isinstance(m, torch.nn.Linear) and m.weight.numel() > 0 and n != "lm_head"  # noqa: E731
    to_sparse_runtime_(model, format=fmt_, value_dtype=vdt, filter_fn=nonempty)  # (a width-0 shared expert stays)
    experts_to_sparse_runtime_(model, format=fmt_, value_dtype=vdt)
    return model


FORMATS = [None, "dense", "bf16", "bitmask", "2:4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixtral_fused_equal_python(fmt):
    model = _variant(make_tiny("mixtral", seed=1), fmt)
    if fmt is not None:
        assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
    compare_fast_and_python(model, steps=6, prompt_len=7, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("shared", "norm_topk"), [(True, False), (True, True), (False, False)])
def test_qwen2_moe_fused_equal_python(shared, norm_topk, fmt):
    compare_fast_and_python(_variant(_qwen(shared, norm_topk, seed=2), fmt), steps=6, prompt_len=7, atol=1e-4)


@pytest.mark.parametrize("mode", ["region", "per_matvec"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("fmt", [None, "bitmask"])
def test_moe_two_threads(family, fmt, mode):
    model = _variant(make_tiny(family, seed=3), fmt)
    compare_fast_and_python(model, steps=5, prompt_len=7, mode=mode, threads=2, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_quantized_experts(family):
    """q4 experts (int4-g32 round-to-nearest; pruned ones q4_nm): within the int8 x-rounding error of the
    Python step over the same kernels (test_fastpath_quant.py says why not exact)."""
    for pattern in (None, "2:4"):
        model = make_tiny(family, seed=12)
        if pattern:
            _prune_experts_(model, pattern)
        counts = experts_to_sparse_runtime_(model, format="q4")
        assert set(counts) == ({"q4_nm"} if pattern else {"q4"}), counts
        fast, _ = fused_tracks_python(model, prompt_len=8)
        assert fast.fused_steps == 5


def test_moe_greedy_tokens_equal_transformers():
    """greedy_generate (the fused step) against transformers' generate, Qwen2-MoE with a shared expert."""
    model = _qwen(shared=True, norm_topk=True, seed=4)
    ids = prompt(5, 6)
    res = greedy_generate(model, ids, 12, stop_at_eos=False)
    assert res.path == "fused", res.path_reason
    want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert res.tokens == want


def test_wrong_routing_is_caught(monkeypatch):
    """The comparison can fail: the fused step packed with the wrong top-k renormalization (or one expert
    fewer) gives logits unlike the Python step's."""
    model = _qwen(shared=True, norm_topk=False, seed=6)
    pack = fastpack_moe.pack
    for change in ({"moe.norm_topk": 1}, {"moe.top_k": 1}):

        def wrong(arch, i, change=change):
            tensors, ints = pack(arch, i)
            return tensors, ints | change

        monkeypatch.setattr(fastpack_moe, "pack", wrong)
        with pytest.raises(AssertionError):
            compare_fast_and_python(model, steps=3, prompt_len=5, atol=1e-4)
    monkeypatch.setattr(fastpack_moe, "pack", pack)
    compare_fast_and_python(model, steps=3, prompt_len=5, atol=1e-4)


def test_moe_reasons():
    """What keeps an MoE model on the Python step is named: activation sparsity, an unknown expert format."""
    model = make_tiny("mixtral")
    assert fastpath.ineligible_reason(model, torch.zeros(1)) is None
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=torch.randint(3, 256, (4, 32)))
    assert "MoE model" in fastpath.ineligible_reason(model, torch.zeros(1))
    model = make_tiny("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.data = model.model.layers[1].mlp.experts.down_proj.double()
    assert "layer 1 expert projection e0.down" in fastpath.ineligible_reason(model, torch.zeros(1))


def test_sparse_experts_equal_transformers_experts():
    """ExpertList (dense fp32) computes the block's output as transformers' experts module does."""
    model = make_tiny("mixtral", seed=7)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        want = model.model.layers[0].mlp(x)
        experts_to_sparse_runtime_(model, format="dense")
        got = model.model.layers[0].mlp(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _windows(seed: int, n: int = 8, t: int = 64) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_teal_per_expert_sparsity_near_target():
    """TEAL on Mixtral: every routed expert's gate/up and down inputs get their own threshold from the
    tokens routed to it, and on held-out tokens each expert's realised input sparsity is near the target."""
    from sparseland.activations import get_state, measure_sparsity

    model = make_tiny("mixtral", seed=8)
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=_windows(1))
    state = get_state(model)
    experts = {s.module: s for s in state.sites if ".experts." in s.module}
    assert len(experts) == 3 * 4 * 3 and not state.expert_fallback  # layers x experts x (gate, up, down)
    assert len({float(s.threshold) for n, s in experts.items() if ".gate." in n}) == 12  # one per expert
    got = measure_sparsity(model, _windows(2))
    for name in experts:
        assert abs(got[name] - 0.4) < 0.1, (name, got[name])
    # the Python step applies them (the fused step says why not), before and after the runtime formats
    dec = LeanDecoder(model, 16)
    assert dec.fast is None and "MoE model" in dec.fast_reason
    ids = prompt(3, 6)
    before = greedy_generate(model, ids, 6, stop_at_eos=False).tokens
    to_sparse_runtime_(model)
    assert greedy_generate(model, ids, 6, stop_at_eos=False).tokens == before


def test_teal_expert_without_calibration_tokens_falls_back():
    """Experts the router never chose on the calibration windows take their block's pooled samples,
    and are listed in the activation state's expert_fallback."""
    import transformers as tf

    from sparseland.activations import get_state

    torch.manual_seed(9)
    cfg = tf.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=1, pad_token_id=0,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=_windows(4, n=1, t=3))  # 3 tokens: <= 3 experts
    state = get_state(model)
    assert len(state.expert_fallback) >= 2 * 5 * 3
    thr = {s.module: float(s.threshold) for s in state.sites}
    for layer in range(2):
        fell = [n for n in state.expert_fallback if n.startswith(f"model.layers.{layer}.") and ".gate." in n]
        assert len({thr[n] for n in fell}) == 1  # one pooled threshold per block and input kind
    greedy_generate(model, prompt(0, 4), 3)  # the Python step runs them


def test_split_experts_pruned_as_linears():
    """Experts split into Linears (ExpertList) are pruned by Wanda like any Linear, the router left dense."""
    from sparseland.runtime.experts import split_experts_
    from sparseland.weights import WandaConfig

    model = make_tiny("mixtral", seed=1)
    split_experts_(model)
    sparsify_(model, WandaConfig(sparsity=0.5), calibration=_windows(3, n=2, t=16))
    for layer in model.model.layers:
        ex = layer.mlp.experts
        for lin in [*ex.gate, *ex.up, *ex.down]:
            assert abs(float((lin.weight == 0).float().mean()) - 0.5) < 0.01
        assert not bool((layer.mlp.gate.weight == 0).any())


def test_checkpoint_of_split_experts_loads_as_transformers_experts(tmp_path):
    """A model whose experts TEAL split saves them as the 3-D weights; the loaded model's logits equal."""
    from sparseland.runtime import load_sparse_checkpoint, save_sparse_checkpoint
    from sparseland.runtime.experts import split_experts_

    model = make_tiny("mixtral", seed=13)
    split_experts_(model)
    ids = prompt(1, 6)
    with torch.no_grad():
        want = model(ids).logits
    save_sparse_checkpoint(model, None, tmp_path / "ck", metadata={})
    loaded = load_sparse_checkpoint(tmp_path / "ck")[0]
    assert not isinstance(loaded.model.layers[0].mlp.experts, ExpertList)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    experts_to_sparse_runtime_(model)
    with pytest.raises(Exception, match="before experts_to_sparse_runtime_"):
        save_sparse_checkpoint(model, None, tmp_path / "ck2", metadata={})
