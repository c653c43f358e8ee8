"""Metrics against hand computations, and the splice against its defining properties."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sparseland.sae.metrics import (
    FVUAccumulator,
    SparsityAccumulator,
    SpliceResult,
    kl_clean_to,
    next_token_ce,
    splice_metrics,
    split_mean,
)
from sparseland.sae.sites import capture, splice

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0], [4.0, 9.0]])
    mean = split_mean([x[:2], x[2:]], 2)
    assert torch.allclose(mean, torch.tensor([3.0, 5.0], dtype=torch.float64))
    acc = FVUAccumulator(mean)
    acc.update(x[:1], x_hat[:1])
    acc.update(x[1:], x_hat[1:])
    # errors: 0+1, 0+1, 1+0 = 3; deviations from (3, 5): 4+9, 0+1, 4+16 = 34
    assert acc.fvu == pytest.approx(3 / 34, rel=1e-12)
    assert acc.n == 3


def test_fvu_uses_the_given_mean_not_zero():
    x = torch.full((4, 3), 100.0) + torch.randn(4, 3)
    acc = FVUAccumulator(x.double().mean(0))
    acc.update(x, x.mean(0).expand_as(x))  # predicting the mean is FVU 1 exactly
    assert acc.fvu == pytest.approx(1.0, rel=1e-9)
    zero_mean = FVUAccumulator(torch.zeros(3))
    zero_mean.update(x, x.mean(0).expand_as(x))
    assert zero_mean.fvu < 1e-3  # the bug the issue names: variance about zero inflates explained variance


def test_fvu_is_float64_accumulated():
    # float32 sums of 1e4 rows near 1e3 lose the small differences; float64 keeps them
    x = torch.full((10_000, 1), 1000.0)
    x[::2] += 0.01
    acc = FVUAccumulator(x.double().mean(0))
    acc.update(x, x)
    half_gap = (float(x[0, 0]) - float(x[1, 0])) / 2  # 0.01 as float32 represents it
    assert acc.sse == 0.0 and acc.sst == pytest.approx(10_000 * half_gap**2, rel=1e-9)
    naive = ((x - x.mean(0)) ** 2).sum()  # float32 throughout: the mean itself is off
    assert abs(float(naive) - acc.sst) > 1e-6 * acc.sst


def test_l0_and_dead_by_hand():
    z = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    acc = SparsityAccumulator(4)
    acc.update(z[:2])
    acc.update(z[2:])
    assert acc.l0 == pytest.approx(4 / 3)
    assert acc.dead_fraction == 0.5 and acc.n == 3
    assert acc.fired.tolist() == [0, 2, 0, 2]


def test_ce_and_kl_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    ce = next_token_ce(logits, ids)
    assert ce.shape == (2, 3)
    b, t = 1, 2  # logits at position 1 + t predict token 2 + t
    lp = F.log_softmax(logits[b, 1 + t], -1)
    assert ce[b, t] == pytest.approx(float(-lp[ids[b, 2 + t]]), rel=1e-5)
    other = torch.randn(2, 5, 7)
    kl = kl_clean_to(logits, other)
    p, q = F.softmax(logits[b, 1 + t], -1), F.softmax(other[b, 1 + t], -1)
    assert kl[b, t] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4)
    assert kl_clean_to(logits, logits).abs().max() < 1e-6


def test_ce_recovered_formula():
    r = SpliceResult(
        ce_clean=2.0, ce_spliced=2.5, ce_mean_ablation=4.0, ce_zero_ablation=7.0, kl_nats=0.1, n_predictions=10
    )
    assert r.delta_ce_nats == 0.5
    assert r.ce_recovered == pytest.approx(0.75)  # 1 - 0.5 / 2
    assert r.ce_recovered_zero == pytest.approx(0.9)  # 1 - 0.5 / 5


@pytest.mark.parametrize("site", ["resid", "mlp_in", "mlp_out", "attn_out"])
def test_identity_splice_changes_nothing(tiny_llama, site):
    ids = torch.randint(3, 256, (2, 12))
    mean = torch.zeros(64)
    res = splice_metrics(tiny_llama, ids, 1, site, lambda a: a.clone(), mean)
    assert res.delta_ce_nats == pytest.approx(0.0, abs=1e-5)
    assert res.kl_nats == pytest.approx(0.0, abs=1e-5)
    assert res.ce_zero_ablation != pytest.approx(res.ce_clean, abs=1e-4)
    assert res.n_predictions == 2 * 10


def test_splice_keeps_position_zero_and_replaces_the_rest(tiny_llama):
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad(), capture(tiny_llama, 0, ("resid",), stop=False) as clean:
        tiny_llama(input_ids=ids)
        ref = clean["resid"].clone()
    with (
        torch.no_grad(),
        splice(tiny_llama, 0, "resid", torch.zeros_like),
        capture(tiny_llama, 0, ("resid",), stop=False) as seen,
    ):
        out_spliced = tiny_llama(input_ids=ids).logits
    # capture hooks run after the splice hook registered before them: the replaced value is what block 1 reads
    got = seen["resid"]
    assert torch.equal(got[:, 0], ref[:, 0]) and got[:, 1:].abs().max() == 0
    assert not torch.allclose(out_spliced, tiny_llama(input_ids=ids).logits)


def test_transcoder_splice_reads_mlp_in(tiny_llama):
    """Splicing mlp_out from mlp_in with the MLP itself reproduces the clean pass exactly."""
    ids = torch.randint(3, 256, (2, 10))
    mlp = copy.deepcopy(tiny_llama.model.layers[1].mlp)  # the hooked module itself would recurse
    res = splice_metrics(tiny_llama, ids, 1, "mlp_out", mlp, torch.zeros(64), source_site="mlp_in")
    assert res.kl_nats == pytest.approx(0.0, abs=1e-5)
    res_mean = splice_metrics(
        tiny_llama, ids, 1, "mlp_out", lambda a: a * 0 + 1.0, torch.ones(64), source_site="mlp_in"
    )
    assert res_mean.ce_spliced == pytest.approx(res_mean.ce_mean_ablation, abs=1e-5)
    assert math.isfinite(res_mean.ce_recovered)
