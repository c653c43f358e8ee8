import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.training import SRSTE, ProgressiveGradientFlow
from sparseland.training.nm import _SoftMask, structure_schedule
from sparseland.weights.masks import is_nm
from tests.training._helpers import make_optimizer, tiny, train


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "1:8"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_srste_masks_are_nm_at_every_step_and_end_exact(pattern, opt_name):
    n, m = map(int, pattern.split(":"))
    model = tiny()
    opt = make_optimizer(model, opt_name)
    sp = SRSTE(model, opt, pattern=pattern, total_steps=12)
    changed = []

    def check(t):
        if sp.final_masks is None:
            for name in sp.params:
                w = sp.effective_weight(name)
                assert is_nm(w, n, m)
                assert int((w != 0).sum()) == w.numel() * n // m  # exactly N of every M (random init: no ties)
            changed.append({k: v.clone() for k, v in sp.masks.items()})

    train(model, opt, sp, 12, after_step=check)
    assert sp.final_masks is not None  # finalized at total_steps: plain N:M parameters
    for name, p in model.named_parameters():
        if name in sp.params:
            assert is_nm(p.detach(), n, m)
    assert any(not torch.equal(changed[0][k], changed[-1][k]) for k in changed[0])  # masks are recomputed
    final = {k: v.clone() for k, v in sp.final_masks.masks.items()}
    train(model, opt, sp, 5)  # after finalize the mask is held exactly
    sp.final_masks.check()
    assert all(torch.equal(final[k], sp.final_masks.masks[k]) for k in final)


def test_srste_gradient_is_ste_plus_decay_term():
    w = torch.randn(4, 8, requires_grad=True)
    mask = torch.rand(4, 8) > 0.5
    out = _SoftMask.apply(w, mask, 0.0, "srste", 0.1)
    assert torch.equal(out.detach(), w.detach() * mask)
    g = torch.randn(4, 8)
    out.backward(g)
    assert torch.allclose(w.grad, g + 0.1 * (~mask).float() * w.detach())


def test_soft_mask_modes():
    w = torch.randn(4, 8, requires_grad=True)
    mask = torch.rand(4, 8) > 0.5
    out = _SoftMask.apply(w, mask, 0.25, "scaled", 0.0)
    assert torch.allclose(out.detach(), torch.where(mask, w.detach(), 0.25 * w.detach()))
    out.sum().backward()
    assert torch.allclose(w.grad, torch.where(mask, 1.0, 0.25))
    w.grad = None
    _SoftMask.apply(w, mask, 0.25, "ste", 0.0).sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 8))


@pytest.mark.parametrize("decay", ["linear", "exp", "structure"])
@pytest.mark.parametrize("gradient", ["ste", "scaled"])
def test_gradient_flow_decays_and_ends_exactly_nm(decay, gradient):
    model = tiny()
    opt = make_optimizer(model, "adamw")
    sp = ProgressiveGradientFlow(
        model,
        opt,
        pattern="1:8",
        total_steps=20,
        decay=decay,
        dense_fraction=0.1,
        fine_tune_fraction=0.25,
        gradient=gradient,
    )
    assert (sp.t_dense, sp.t_fine) == (2, 15)
    name = next(iter(sp.params))
    assert torch.equal(sp.effective_weight(name), sp.params[name].detach())  # dense phase: no mask
    phases = [sp.phase(t) for t in range(21)]
    if decay != "structure":
        betas = [b for n, b, _ in phases[2:15]]
        assert betas[0] == pytest.approx(1.0) and all(a > b for a, b in zip(betas, betas[1:], strict=False))
        assert betas[-1] < 0.1
    else:
        assert [n for n, _, _ in phases[2:15]] == sorted([n for n, _, _ in phases[2:15]], reverse=True)
        assert {n for n, _, _ in phases[2:15]} == {7, 4, 2, 1}

    def check(t):
        if sp.t_fine <= t < 20:  # hard 1:8 in the fine-tune phase
            for nm_name in sp.params:
                assert is_nm(sp.effective_weight(nm_name), 1, 8)
        if 2 <= t < sp.t_fine and decay != "structure":  # soft: the pruned weights still count
            w = sp.effective_weight(name)
            assert not is_nm(w, 1, 8)

    train(model, opt, sp, 20, after_step=check)
    assert sp.final_masks is not None
    for n_, p in model.named_parameters():
        if n_ in sp.params:
            assert is_nm(p.detach(), 1, 8) and int((p != 0).sum()) == p.numel() // 8


def test_structure_schedule_and_bad_input():
    assert structure_schedule(1, 8) == [7, 4, 2, 1]
    assert structure_schedule(2, 4) == [3, 2]
    assert structure_schedule(1, 4) == [3, 2, 1]
    with pytest.raises(SparselandError, match="not divisible by M=7"):
        SRSTE(tiny(), None, pattern="1:7")
    with pytest.raises(SparselandError, match="gradient='nope'"):
        ProgressiveGradientFlow(tiny(), None, total_steps=5, gradient="nope")


def test_remove_restores_plain_dense_parameters():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = SRSTE(model, None, pattern="2:4")
    assert any("parametrizations" in n for n, _ in model.named_parameters())
    sp.remove()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n].detach(), before[n]) for n in before)
