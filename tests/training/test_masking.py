import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.training.masking import MaskSet, reset_optimizer_state


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masks_hold_through_optimizer_steps(opt_name):
    model = _model()
    masks = {n: torch.rand(p.shape) > 0.7 for n, p in model.named_parameters() if p.dim() == 2}
    ms = MaskSet(model, masks)
    ms.apply_()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(20):
        loss = model(torch.randn(5, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        ms.mask_grads_()
        opt.step()
        ms.apply_()
        ms.check()
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.equal(p.detach() != 0, masks[n])  # kept weights moved away from zero, pruned stayed


def test_from_zeros_and_bad_masks():
    model = _model()
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    ms = MaskSet.from_zeros(model, ["0.weight"])
    assert ms.density() == pytest.approx(0.5)
    with pytest.raises(SparselandError, match="unknown parameter"):
        MaskSet(model, {"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(SparselandError, match="must be bool"):
        MaskSet(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_reset_optimizer_state_zeroes_only_where():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    p = model[0].weight
    where = torch.zeros_like(p, dtype=torch.bool)
    where[0] = True
    before = opt.state[p]["momentum_buffer"].clone()
    reset_optimizer_state(opt, p, where)
    buf = opt.state[p]["momentum_buffer"]
    assert torch.all(buf[0] == 0) and torch.equal(buf[1:], before[1:])
