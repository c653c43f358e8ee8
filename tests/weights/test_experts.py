"""MoE experts pruned from the tokens routed to them (weights/experts.py)."""

import pytest
import torch

from sparseland.weights.config import MagnitudeConfig, WandaConfig
from sparseland.weights.experts import prune_experts_
from sparseland.weights.masks import make_mask, wanda_scores
from sparseland.weights.pruner import InputStats, prune_weight
from tests.models.arch_configs import make_tiny


def _stats(x):
    if x is None:
        return None
    st = InputStats(x.shape[-1], gram=False)
    st.add(x)
    return st


@pytest.mark.usefixtures("one_thread")
def test_each_expert_uses_only_its_routed_tokens():
    experts = make_tiny("mixtral").model.layers[0].mlp.experts
    E, _, C = experts.gate_up_proj.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, C, generator=g)
    hidden[::2, :8] *= 50  # tokens routed to expert 0 have huge first channels; the others do not
    idx = torch.stack([torch.where(torch.arange(40) % 2 == 0, 0, 1), torch.full((40,), 2)], -1)  # (N, 2)
    before = experts.gate_up_proj.detach().clone()
    cfg = WandaConfig(sparsity=0.5)

    def prune(name, W, st):
        return prune_weight(W, cfg if st is not None else MagnitudeConfig(), 0.5, st, name, 0)

    done = prune_experts_(experts, "experts", prune, _stats, (hidden, idx))
    for e, tokens in ((0, hidden[::2]), (1, hidden[1::2]), (2, hidden)):
        want = make_mask(wanda_scores(before[e], tokens.norm(dim=0)), 0.5, None)
        assert torch.equal(experts.gate_up_proj[e] != 0, want)
    assert done["experts.gate_up_proj.0"][0] == before[0].numel() // 2
    # expert 3 got no token: no statistics, the caller's rule without them (here magnitude)
    assert torch.equal(experts.gate_up_proj[3] != 0, make_mask(before[3].abs(), 0.5, None))
    # the routed tokens decide: expert 0 keeps the huge input channels' weights far more than expert 1
    kept0 = (experts.gate_up_proj[0][:, :8] != 0).float().mean()
    kept1 = (experts.gate_up_proj[1][:, :8] != 0).float().mean()
    assert kept0 > 0.9 and kept1 < 0.8
