import math

import pytest
import torch
import torch.nn.functional as F

from sparseland.errors import SparselandError
from sparseland.training.distill import distillation_loss, kd_loss, squarehead_loss


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_zero_for_identical_logits_and_positive_otherwise(temperature):
    t = _logits(0)
    assert kd_loss(t.clone(), t, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(t + 5.0, t, temperature).item() == pytest.approx(0.0, abs=1e-5)  # softmax ignores a shift
    assert kd_loss(_logits(1), t, temperature).item() > 1e-3


def test_kd_matches_the_definition_and_is_asymmetric():
    s, t, T = _logits(1), _logits(2), 2.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s, t, T).item() != pytest.approx(kd_loss(t, s, T).item(), rel=1e-3)  # KL(t||s), not KL(s||t)


def test_squarehead_is_normalised_per_layer():
    h = [torch.randn(2, 3, 8), 100 * torch.randn(2, 3, 8)]
    assert squarehead_loss([x.clone() for x in h], h).item() == 0.0
    # Student = 0 gives MSE(0, h) / MSE(h, 0) = 1 in every layer, whatever the layer's scale.
    assert squarehead_loss([torch.zeros_like(x) for x in h], h).item() == pytest.approx(1.0)
    # Halving the student in one layer only: (0.25 + 0) / 2 regardless of that layer's magnitude.
    assert squarehead_loss([0.5 * h[0], h[1]], h).item() == pytest.approx(0.125)
    assert squarehead_loss([h[0], 0.5 * h[1]], h).item() == pytest.approx(0.125)


def test_distillation_loss_mixes_the_terms():
    s, t = _logits(3), _logits(4)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    hs, ht = [torch.randn(2, 5, 4)], [torch.randn(2, 5, 4)]
    out = distillation_loss(
        s,
        t,
        ids,
        temperature=1.5,
        kd_weight=0.7,
        ce_weight=0.2,
        feature_weight=3.0,
        student_hidden=hs,
        teacher_hidden=ht,
    )
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert out.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.kd.item() == pytest.approx(kd_loss(s, t, 1.5).item(), rel=1e-6)
    assert out.feature.item() == pytest.approx(squarehead_loss(hs, ht).item(), rel=1e-6)
    expected = 0.7 * out.kd + 0.2 * out.ce + 3.0 * out.feature
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(out.total.item())


def test_gradient_flows_to_the_student_only():
    s = _logits(5).requires_grad_(True)
    t = _logits(6).requires_grad_(True)
    distillation_loss(s, t.detach()).total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bad_input_is_named():
    t = _logits(0)
    with pytest.raises(SparselandError, match="temperature"):
        distillation_loss(t, t, temperature=0)
    with pytest.raises(SparselandError, match="vocabulary"):
        kd_loss(t, t[..., :5])
    with pytest.raises(SparselandError, match="input_ids"):
        distillation_loss(t, t, ce_weight=1.0)
    with pytest.raises(SparselandError, match="hidden"):
        distillation_loss(t, t, feature_weight=1.0)
    with pytest.raises(SparselandError, match="one teacher hidden state per student layer"):
        squarehead_loss([torch.ones(1, 2, 3)], [])
