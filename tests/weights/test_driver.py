"""sparsify_ on tiny random Llamas: requested sparsity in every pruned Linear, lm_head and embeddings dense,
determinism, config validation."""

import pytest
import torch

from sparseland import sparsify_
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.weights import (
    DSnoTConfig,
    MagnitudeConfig,
    RandomConfig,
    SparseGPTConfig,
    WandaConfig,
    is_nm,
)
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def pruned_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def run(cfg, **kw):
    model = make_tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsify_(model, cfg, calibration=CALIB, **kw)
    return model, dense, report


def assert_dense_outside_blocks(model, dense):
    assert torch.equal(model.model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, dense["lm_head.weight"])


ROW_EXACT = [MagnitudeConfig, RandomConfig, WandaConfig, DSnoTConfig]


@pytest.mark.parametrize("cls", ROW_EXACT)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_exact_per_row(cls, sparsity):
    model, dense, report = run(cls(sparsity=sparsity))
    for name, mod in pruned_linears(model).items():
        k = int(mod.in_features * sparsity)
        assert ((mod.weight == 0).sum(1) == k).all(), name
        assert report.layer_sparsity[name] == pytest.approx(k / mod.in_features)
    assert_dense_outside_blocks(model, dense)
    assert report.seconds >= 0 and report.method == cls.kind


@pytest.mark.parametrize("cls", [*ROW_EXACT, SparseGPTConfig])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_in_every_linear(cls, pattern):
    n, m = map(int, pattern.split(":"))
    model, dense, report = run(cls(pattern=pattern))
    assert report.target_sparsity == pytest.approx(1 - n / m)
    for name, mod in pruned_linears(model).items():
        assert is_nm(mod.weight, n, m), name
        assert float((mod.weight == 0).float().mean()) == pytest.approx(1 - n / m), name
    assert_dense_outside_blocks(model, dense)


def test_sparsegpt_layer_sparsity_and_updates():
    model, dense, report = run(SparseGPTConfig(sparsity=0.6, blocksize=32))
    for name in pruned_linears(model):
        assert report.layer_sparsity[name] == pytest.approx(0.6, abs=1e-2), name
    q = model.model.layers[0].self_attn.q_proj.weight
    q0 = dense["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q[q != 0], q0[q != 0])  # SparseGPT updates the kept weights
    assert_dense_outside_blocks(model, dense)


def test_owl_blocks_average_to_target():
    model, dense, report = run(WandaConfig(sparsity=0.6, allocation="owl"))
    assert sum(report.block_sparsity) / len(report.block_sparsity) == pytest.approx(0.6)
    for i, s in enumerate(report.block_sparsity):
        for mod in pruned_linears(model.model.layers[i]).values():
            assert ((mod.weight == 0).sum(1) == int(mod.in_features * s)).all()
    assert_dense_outside_blocks(model, dense)


@pytest.mark.parametrize("cfg", [RandomConfig(seed=3), WandaConfig(), DSnoTConfig(init="magnitude")])
def test_same_seed_same_masks(cfg):
    a, _, _ = run(cfg)
    b, _, _ = run(cfg)
    for (name, ma), mb in zip(pruned_linears(a).items(), pruned_linears(b).values(), strict=True):
        assert torch.equal(ma.weight, mb.weight), name


def test_random_seed_changes_mask():
    a, _, _ = run(RandomConfig(seed=1))
    b, _, _ = run(RandomConfig(seed=2))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_filter_fn_leaves_other_layers_dense():
    model, dense, report = run(WandaConfig(), filter_fn=lambda mod, name: "mlp" in name)
    assert all("mlp" in n for n in report.layer_sparsity)
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, dense["model.layers.1.self_attn.o_proj.weight"])


def test_model_still_runs():
    model, _, _ = run(SparseGPTConfig(pattern="2:4"))
    logits = model(input_ids=CALIB[:2]).logits
    assert torch.isfinite(logits).all()


def test_calibration_required():
    with pytest.raises(SparselandError, match="calibration"):
        sparsify_(make_tiny_llama(), WandaConfig())
    with pytest.raises(SparselandError, match="LongTensor"):
        sparsify_(make_tiny_llama(), WandaConfig(), calibration=torch.rand(2, 8))
    sparsify_(make_tiny_llama(), MagnitudeConfig())  # data-free methods need none


def test_nm_indivisible_names_layer():
    with pytest.raises(SparselandError, match=r"model\.layers\.0\..*divisible by M=7"):
        sparsify_(make_tiny_llama(), MagnitudeConfig(pattern="3:7"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WandaConfig(sparsity=1.0), "sparsity"),
        (lambda: WandaConfig(sparsity=-0.1), "sparsity"),
        (lambda: WandaConfig(pattern="4:2"), "0 < N < M"),
        (lambda: WandaConfig(pattern="2by4"), "pattern"),
        (lambda: WandaConfig(pattern="2:4", sparsity=0.7), "disagrees"),
        (lambda: WandaConfig(allocation="global"), "allocation"),
        (lambda: WandaConfig(pattern="2:4", allocation="owl"), "N:M"),
        (lambda: SparseGPTConfig(blocksize=0), "blocksize"),
        (lambda: SparseGPTConfig(percdamp=0), "percdamp"),
        (lambda: DSnoTConfig(init="obs"), "init"),
        (lambda: DSnoTConfig(max_cycles=0), "max_cycles"),
        (lambda: RandomConfig(seed=-1), "seed"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(SparselandError, match=match):
        make()


def test_config_json_round_trip():
    for cfg in (
        WandaConfig(pattern="2:4"),
        SparseGPTConfig(sparsity=0.6, allocation="owl"),
        DSnoTConfig(init="sparsegpt"),
    ):
        assert SparsityConfig.from_json(cfg.to_json()) == cfg


def test_collected_stats_match_each_linear_input():
    """Linears fed the same tensor share statistics; no Linear gets another one's (regression test)."""
    from sparseland.weights.pruner import block_linears, capture_block_inputs, collect_stats

    model = make_tiny_llama()
    layers = model.model.layers
    batches = capture_block_inputs(model, layers, CALIB)
    linears = block_linears(layers[0], "model.layers.0", None)
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
        for n, m in linears.items()
    ]
    for hidden, kwargs in batches:
        layers[0](hidden, **kwargs)
    for h in hooks:
        h.remove()
    stats = collect_stats(layers[0], linears, batches, gram=True)
    for name, xs in seen.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        assert stats[name].n == X.shape[0], name
        assert torch.allclose(stats[name].sumsq, (X * X).sum(0), rtol=1e-4), name
        assert torch.allclose(stats[name].gram, X.T @ X, rtol=1e-4, atol=1e-6), name
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]
    assert stats["model.layers.0.mlp.gate_proj"] is not stats["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("cls", [*ROW_EXACT, SparseGPTConfig])
def test_pruned_weights_are_positive_zero(cls):
    # -0.0 is a distinct value to the bit-exact sparse checkpoint: pruning must write +0.0.
    model, _, _ = run(cls(sparsity=0.5))
    for name, mod in pruned_linears(model).items():
        zeros = mod.weight == 0
        assert not torch.signbit(mod.weight[zeros]).any(), name


def test_one_pass_output_is_the_pruned_blocks_output_and_stats_are_sequential():
    """The block's single forward prunes each Linear before it runs: its output equals the pruned block run
    afresh, and o_proj's statistics are of the input the pruned q/k/v make (true sequential)."""
    from sparseland.weights.pruner import block_linears, capture_block_inputs, prune_block_in_one_pass, run_block

    model = make_tiny_llama()
    block = model.model.layers[0]
    batches = capture_block_inputs(model, model.model.layers, CALIB, batch_size=CALIB.shape[0])
    linears = block_linears(block, "model.layers.0", None)
    seen_o = []
    hook = linears["model.layers.0.self_attn.o_proj"].register_forward_hook(lambda m, a, o: seen_o.append(a[0]))
    stats = {}

    def prune(name, mod, st):
        stats[name] = st
        mod.weight.data[:, ::2] = 0

    out = prune_block_in_one_pass(block, linears, batches, False, prune)
    hook.remove()
    again = run_block(block, batches)
    assert torch.equal(out[0][0], again[0][0])
    x = seen_o[0].reshape(-1, seen_o[0].shape[-1]).double()
    assert torch.allclose(stats["model.layers.0.self_attn.o_proj"].sumsq, (x * x).sum(0), rtol=1e-5)
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.k_proj"]
    with pytest.raises(SparselandError, match="one batch"):
        prune_block_in_one_pass(block, linears, batches * 2, False, prune)
