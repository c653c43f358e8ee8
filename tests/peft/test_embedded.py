"""The real embedded model: a 0.3% adapter on every block Linear merges and unmerges bit-exactly and
keeps a pruned weight's zeros (no training: random deltas at the positions SHiRA would pick)."""

from __future__ import annotations

import pytest
import torch

from sparseland.peft import Adapter, TensorDelta, merge_adapter_, unmerge_adapter_
from sparseland.peft.select import shira_indices
from sparseland.peft.train import budget_params, split_budget, target_linears

pytestmark = pytest.mark.slow


def test_embedded_merge_unmerge_is_bit_exact(embedded):
    from sparseland.peft import SHiRAConfig

    model, _ = embedded
    linears = target_linears(model, SHiRAConfig().targets)
    n = budget_params(model, SHiRAConfig(budget=0.003))
    ks = split_budget({name: m.weight.numel() for name, m in linears.items()}, n)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for i, (name, m) in enumerate(linears.items()):
        idx = shira_indices(m.weight, ks[name], "random", i)
        deltas[name + ".weight"] = TensorDelta(tuple(m.weight.shape), 1e-3 * torch.randn(idx.numel(), generator=g), idx)
    adapter = Adapter(deltas)
    assert adapter.n_params == n
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    record = merge_adapter_(model, adapter)
    changed = sum(int((v != base[k]).sum()) for k, v in model.state_dict().items())
    assert 0.9 * n <= changed <= n  # a few deltas round away next to a large weight
    unmerge_adapter_(model, record)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32), base[k].view(torch.int32)), k
