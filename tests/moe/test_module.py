"""MoEMLP: the sparse result equals the dense MLP with the skipped experts' neurons removed; budgets,
decode path, chunk reuse, learned router."""

import copy

import pytest
import torch

from sparseland import sparsify_
from sparseland.moe import MoEfyConfig, MoEMLP, moe_layers
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _moefied(**kw):
    dense = make_tiny_llama()
    model = copy.deepcopy(dense)
    report = sparsify_(model, MoEfyConfig(**{"experts": 8, "router_steps": 60, **kw}), calibration=CALIB)
    return dense, model, report


@pytest.mark.parametrize("construction", ["cmoe", "kmeans", "random"])
def test_all_experts_active_is_the_dense_model(construction):
    dense, model, _ = _moefied(active=1.0, construction=construction)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)


def test_sparse_output_is_the_dense_mlp_without_the_skipped_neurons():
    dense, model, _ = _moefied(active=0.5, construction="cmoe")
    moe = model.model.layers[0].mlp
    mlp = dense.model.layers[0].mlp
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        sel = moe.select(x)  # (3, 5, E)
        keep_new = moe.neuron_mask(sel)  # (3, 5, I) in the permuted order
        # recover the permutation from the weights and remove the skipped neurons from the DENSE MLP
        perm = [int((mlp.gate_proj.weight == row).all(1).nonzero()) for row in moe.gate_proj.weight]
        keep_old = torch.zeros_like(keep_new)
        keep_old[..., perm] = keep_new
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * keep_old
        torch.testing.assert_close(moe(x), mlp.down_proj(h), atol=1e-5, rtol=1e-5)
        assert keep_new.mean().item() == pytest.approx(0.5)  # 2 shared + 2 of 6 routed experts of size 16


@pytest.mark.parametrize("active", [0.25, 0.5, 0.75])
def test_topk_runs_exactly_the_budget(active):
    _, model, report = _moefied(active=active, construction="random")
    assert report.calib_active == pytest.approx([active] * 2)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 20)))
    for m in moe_layers(model).values():
        assert m.active_fraction() == pytest.approx(active)


def test_threshold_routing_meets_the_budget_on_average():
    _, model, report = _moefied(active=0.5, routing="threshold", construction="kmeans")
    assert report.calib_active == pytest.approx([0.5, 0.5], abs=0.02)
    with torch.no_grad():  # per token the count varies
        sel = model.model.layers[0].mlp.select(torch.randn(50, 64))
    assert sel.sum(1).unique().numel() > 1


def test_one_token_decode_equals_the_batched_path():
    _, model, _ = _moefied(active=0.5, construction="cmoe")
    moe = model.model.layers[1].mlp
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        y_decode = moe(x)
        sel = moe.select(x)
        h = moe.act_fn(moe.gate_proj(x)) * moe.up_proj(x) * moe.neuron_mask(sel)
        torch.testing.assert_close(y_decode, moe.down_proj(h), atol=1e-5, rtol=1e-5)


def test_chunk_reuse_keeps_the_experts_for_chunk_tokens():
    _, model, _ = _moefied(active=0.5, construction="kmeans", chunk=3)
    moe = model.model.layers[0].mlp
    seen = []
    real_select = moe.select
    moe.select = lambda x: seen.append(1) or real_select(x)  # count fresh routing decisions
    with torch.no_grad():
        moe(torch.randn(1, 4, 64))  # a prompt: routed per token, resets the reuse
        for _ in range(7):
            moe(torch.randn(1, 1, 64))
    assert len(seen) == 1 + 3  # prompt, then decode tokens 1, 4 and 7 route; the others reuse


def test_learned_router_predicts_the_largest_output_experts():
    _, _, learned = _moefied(active=0.5, construction="random", router="learned", router_steps=200)
    assert min(learned.router_recall) > 0.6  # chance is 0.5 at half the experts


def test_moefy_skips_layers_the_filter_rejects_and_is_idempotent():
    model = make_tiny_llama()
    cfg = MoEfyConfig(experts=8, active=0.5)
    sparsify_(model, cfg, calibration=CALIB, filter_fn=lambda m, name: name.endswith("1.mlp"))
    assert not isinstance(model.model.layers[0].mlp, MoEMLP) and isinstance(model.model.layers[1].mlp, MoEMLP)
    report = sparsify_(model, cfg, calibration=CALIB)
    assert report.layers == 1  # the MoE layer is left as is
