"""The fused decode step on activation-sparse models (TEAL / CATS / CHESS / WINA thresholds) against the
lean loop's Python step, which applies the sites' hooks and runs the actsparse kernels (the reference)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.activations import CATSConfig, CHESSConfig, RSparseConfig, TEALConfig, WINAConfig
from sparseland.activations.sites import Site, get_state, install
from sparseland.api import sparsify_
from sparseland.runtime import fastpath
from sparseland.runtime.formats import ActSparseBitmaskFormat, ActSparseFormat
from sparseland.runtime.generate import LeanDecoder, greedy_generate
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import compare_fast_and_python as _compare
from tests.runtime.helpers import magnitude_prune_
from tests.runtime.helpers import prompt as _prompt
from tests.runtime.helpers import require_fast_step as _require_extension

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "teal": lambda s: TEALConfig(sparsity=s),
    "cats": lambda s: CATSConfig(sparsity=s),
    "chess": lambda s: CHESSConfig(sparsity=s),
    "wina": lambda s: WINAConfig(sparsity=s, mode="threshold"),  # per-channel input thresholds
}


def _calib(seed=0, n=4, T=32):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def _model(method: str, pruned: bool, sparsity=0.5, value_dtype="float32", seed=3, **kw):
    """A tiny Llama with ``method``'s activation sparsity, converted by ``to_sparse_runtime_``."""
    kw = {"hidden": 96, "intermediate": 200, "heads": 6, "kv_heads": 2, **kw}
    model = make_tiny_llama(seed=seed, **kw)
    if pruned:
        magnitude_prune_(model, 0.5)
    sparsify_(model, CONFIGS[method](sparsity), calibration=_calib(seed))
    to_sparse_runtime_(model, value_dtype=value_dtype)
    return model


def _act_formats(model) -> set[str]:
    return {m.weight_format.name for m in model.modules() if isinstance(m, SparseLinear)} & {
        "actsparse",
        "actsparse_bitmask",
    }


# ----- the methods, dense and pruned weights ------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True], ids=["dense_w", "pruned_w"])
@pytest.mark.parametrize("method", ["teal", "chess", "cats", "wina"])
def test_fast_step_matches_python_step(method, pruned):
    model = _model(method, pruned)
    assert _act_formats(model) == {"actsparse_bitmask" if pruned else "actsparse"}
    _compare(model, steps=6)


@pytest.mark.parametrize("method", ["teal", "chess", "cats"])
def test_greedy_tokens_equal_python_step(method):
    _require_extension()
    model = _model(method, pruned=True, seed=5)
    ids = _prompt(2, 9)
    assert LeanDecoder(model, 30).fast is not None
    fast = greedy_generate(model, ids, 16, stop_at_eos=False).tokens
    with fastpath.use(False):
        assert LeanDecoder(model, 30).fast is None
        assert greedy_generate(model, ids, 16, stop_at_eos=False).tokens == fast


@pytest.mark.parametrize("value_dtype", ["bfloat16"])
@pytest.mark.parametrize("method", ["teal", "chess"])
def test_bf16_values(method, value_dtype):
    _compare(_model(method, pruned=True, value_dtype=value_dtype), steps=5)
    _compare(_model(method, pruned=False, value_dtype=value_dtype), steps=5)


@pytest.mark.parametrize("mode", ["region", "per_matvec"])
@pytest.mark.parametrize("method", ["teal", "chess"])
def test_two_threads_both_modes(method, mode):
    _compare(_model(method, pruned=True, seed=4), steps=5, mode=mode, threads=2)
    _compare(_model(method, pruned=False, seed=4), steps=5, mode=mode, threads=2)


def test_sites_actually_zero_and_differ_from_dense():
    """The fused step applies the thresholds: its logits equal the hooked Python step's, not the dense model's."""
    _require_extension()
    dense = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=3)
    sparse = _model("teal", pruned=False, sparsity=0.6)
    ids = _prompt(1)
    a, b = LeanDecoder(sparse, 8), LeanDecoder(dense, 8)
    a.step(ids)
    b.step(ids)
    la, lb = a.step(torch.tensor([[9]])), b.step(torch.tensor([[9]]))
    assert a.fast is not None and (la - lb).abs().max() > 1e-3


# ----- random site sets: any mix of input and gate_act sites, scalar or per-channel thresholds ---------


def _random_sites(model, rng: torch.Generator, p_input: float, p_gate: float, per_channel: bool, level: float):
    """Sites on a random subset of the projections, thresholds at about ``level`` of |x| (random scale)."""
    sites = []
    for i, layer in enumerate(model.model.layers):
        for p in PROJS:
            mod = layer.get_submodule(("self_attn." if p[0] in "qkvo" else "mlp.") + p)
            name = f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
            if float(torch.rand((), generator=rng)) < p_input:
                n = mod.in_features
                t = torch.rand(n if per_channel else (), generator=rng) * 2 * level
                sites.append(Site(name, "input", threshold=t))
            if p == "gate_proj" and float(torch.rand((), generator=rng)) < p_gate:
                n = mod.out_features
                t = torch.rand(n if per_channel else (), generator=rng) * 0.4 * level
                sites.append(Site(name, "gate_act", threshold=t))
    return sites


@settings(max_examples=14, deadline=None)
@given(
    head_dim=st.sampled_from([4, 10, 16]),
    heads_kv=st.sampled_from([(4, 1), (4, 2), (3, 3), (6, 2)]),
    inter=st.sampled_from([36, 100, 136]),
    pruned=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    layers=st.integers(1, 3),
    p_input=st.sampled_from([0.0, 0.5, 1.0]),
    p_gate=st.sampled_from([0.0, 1.0]),
    per_channel=st.booleans(),
    level=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
    threads=st.sampled_from([1, 2]),
    mode=st.sampled_from(["region", "per_matvec"]),
    seed=st.integers(0, 100),
)
def test_property_random_sites(
    head_dim, heads_kv, inter, pruned, dtype, layers, p_input, p_gate, per_channel, level, threads, mode, seed
):
    heads, kv = heads_kv
    hidden = heads * head_dim  # widths that are not multiples of 8 / 16 exercise the tails
    model = make_tiny_llama(layers=layers, hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, seed=seed)
    if pruned:
        magnitude_prune_(model, 0.6)
    rng = torch.Generator().manual_seed(seed)
    sites = _random_sites(model, rng, p_input, p_gate, per_channel, level)
    if not sites:
        sites = [Site("model.layers.0.mlp.down_proj", "input", threshold=torch.tensor(level))]
    install(model, {"kind": "random"}, sites)
    to_sparse_runtime_(model, value_dtype=dtype)
    _compare(model, steps=4, prompt_len=1 + seed % 5, threads=threads, mode=mode, seed=seed)


# ----- threshold 0 equals the dense fused step -------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True], ids=["dense_w", "pruned_w"])
def test_threshold_zero_equals_dense_fused_step(pruned):
    _require_extension()
    dense = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=11)
    if pruned:
        magnitude_prune_(dense, 0.5)
    act = make_tiny_llama(hidden=96, intermediate=200, heads=6, kv_heads=2, seed=11)
    act.load_state_dict(dense.state_dict())
    zero = torch.zeros(())
    sites = []
    for i in range(len(act.model.layers)):
        sites += [Site(f"model.layers.{i}.self_attn.{p}", "input", threshold=zero) for p in PROJS[:4]]
        sites += [Site(f"model.layers.{i}.mlp.{p}", "input", threshold=zero) for p in PROJS[4:]]
        sites.append(Site(f"model.layers.{i}.mlp.gate_proj", "gate_act", threshold=zero))
    install(act, {"kind": "zero"}, sites)
    to_sparse_runtime_(act)
    to_sparse_runtime_(dense, format="bitmask" if pruned else "dense")
    assert _act_formats(act) == {"actsparse_bitmask" if pruned else "actsparse"}
    a, d = LeanDecoder(act, 14), LeanDecoder(dense, 14)
    assert a.fast is not None and d.fast is not None
    ids = _prompt(4)
    la, ld = a.step(ids), d.step(ids)
    for _ in range(6):
        tok = torch.tensor([[int(ld.argmax())]])
        la, ld = a.step(tok), d.step(tok)
        torch.testing.assert_close(la, ld, atol=2e-5, rtol=1e-5)


# ----- what stays on the Python step, and why -------------------------------------------------------


def _reason(model) -> str | None:
    _require_extension()
    return fastpath.ineligible_reason(model, LeanDecoder(model, 8).k_cache)


def test_topk_and_rsparse_sites_stay_ineligible_with_a_reason():
    _require_extension()
    m = make_tiny_llama(seed=6)
    sparsify_(m, WINAConfig(sparsity=0.5, mode="topk"), calibration=_calib())
    to_sparse_runtime_(m)
    why = _reason(m)
    assert why is not None and "top-k" in why and "keep=" in why and "q_proj" in why
    assert LeanDecoder(m, 8).fast is None
    ids = _prompt(3)
    want = m.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)[0, 7:].tolist()
    assert greedy_generate(m, ids, 4, stop_at_eos=False).tokens == want  # the Python step still runs

    m = make_tiny_llama(seed=6)
    sparsify_(m, RSparseConfig(sparsity=0.5, rank=4), calibration=_calib())
    to_sparse_runtime_(m)
    why = _reason(m)
    assert why is not None and "R-Sparse" in why
    assert LeanDecoder(m, 8).fast is None


def test_hooked_plain_linears_need_the_runtime_formats():
    _require_extension()
    m = make_tiny_llama(seed=6)
    sparsify_(m, TEALConfig(sparsity=0.5), calibration=_calib())
    assert "to_sparse_runtime_" in _reason(m)  # plain Linears: the sites would run densely
    to_sparse_runtime_(m)
    assert _reason(m) is None

    m = make_tiny_llama(seed=6)
    sparsify_(m, CATSConfig(sparsity=0.5), calibration=_calib())
    to_sparse_runtime_(m, activation_sparse=False)  # down_proj keeps a dense format
    assert "down_proj" in _reason(m)

    m = make_tiny_llama(seed=6)
    to_sparse_runtime_(m, format="actsparse")  # actsparse weights without any activation sparsity
    assert "no activation sparsity" in _reason(m)


def test_foreign_hooks_and_missing_hooks_make_it_ineligible():
    _require_extension()
    m = _model("chess", pruned=False, seed=6)
    assert _reason(m) is None
    handle = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: None)
    assert "forward hooks" in _reason(m)
    handle.remove()
    assert _reason(m) is None
    mod = m.model.layers[1].mlp.gate_proj  # drop the gate_act hook but keep the state
    for key in list(mod._forward_hooks):
        del mod._forward_hooks[key]
    assert "no hook" in _reason(m)


def test_bad_thresholds_are_reported():
    _require_extension()
    m = _model("teal", pruned=False, seed=6)
    get_state(m).sites[0].threshold = torch.zeros(3)  # neither () nor (in,)
    assert "threshold has 3 values" in _reason(m)


def test_formats_are_packed_by_kind():
    """Pruned weights under CHESS: actsparse_bitmask where inputs are sparse (q, o, down), bitmask elsewhere."""
    m = _model("chess", pruned=True)
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight_format, ActSparseBitmaskFormat)
    assert isinstance(layer.mlp.down_proj.weight_format, ActSparseBitmaskFormat)
    assert layer.mlp.up_proj.weight_format.name == "bitmask"
    m = _model("cats", pruned=False)
    assert isinstance(m.model.layers[0].mlp.down_proj.weight_format, ActSparseFormat)
    assert m.model.layers[0].self_attn.q_proj.weight_format.name == "dense"


def _margin_hooks(model: torch.nn.Module, margin: list[float]) -> None:
    """Record in ``margin[0]`` the smallest relative distance of a thresholded value from its threshold."""
    import torch.nn.functional as F

    mods = dict(model.named_modules())
    for site in get_state(model).sites:
        t = site.threshold
        if site.where == "gate_act":

            def hook(mod, args, g, t=t):
                rel = ((F.silu(g.detach()).abs() - t).abs() / t.clamp_min(1e-12))[g != 0]
                if rel.numel():
                    margin[0] = min(margin[0], float(rel.min()))

            mods[site.module].register_forward_hook(hook, prepend=True)  # before the site zeroes g
        else:

            def pre(mod, args, t=t):
                margin[0] = min(margin[0], float(((args[0].detach().abs() - t).abs() / t.clamp_min(1e-12)).min()))

            mods[site.module].register_forward_pre_hook(pre, prepend=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teal", "cats", "chess"])
def test_real_model_fast_step_matches(embedded, method):
    """The real model, teacher-forced on the Python step's greedy tokens. Its activations sit on calibrated
    thresholds, so a last-bit difference upstream (the fused step sums in another order) can flip one of
    ~10^5 comparisons per step, and the KV cache carries the change on. So: before any flip, the logits
    agree; a divergence must start at a step where the Python step had a value within 2e-6 (relative) of
    its threshold. A real bug diverges without such a near-tie."""
    import copy

    from sparseland.registry import make_config

    _require_extension()
    model, tok = embedded
    model = copy.deepcopy(model)
    ids = tok("The Python language reference describes", return_tensors="pt")["input_ids"]
    sparsify_(model, make_config(method, 0.5), calibration=ids.repeat(2, 1))
    to_sparse_runtime_(model)
    ref_model = copy.deepcopy(model)
    margin = [float("inf")]
    _margin_hooks(ref_model, margin)  # foreign hooks: the copy runs the Python step
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompt = _prompt(0, ids.shape[1], vocab=1000)
        fast, ref = LeanDecoder(model, prompt.shape[1] + 17), LeanDecoder(ref_model, prompt.shape[1] + 17)
        assert fast.fast is not None and ref.fast is None
        flipped, checked = False, 0
        a, b = fast.step(prompt), ref.step(prompt)  # prompts run the Python step on both sides
        margin[0] = float("inf")
        for i in range(17):
            flipped = flipped or margin[0] < 2e-6
            if not flipped:
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
                checked += 1
            if i < 16:
                margin[0] = float("inf")
                tok_ = torch.tensor([[int(b.argmax())]])
                a, b = fast.step(tok_), ref.step(tok_)
        assert checked >= 2, "a near-tie at the first steps left nothing to compare; change the prompt seed"
    finally:
        torch.set_num_threads(old)
