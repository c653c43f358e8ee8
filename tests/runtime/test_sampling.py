"""``sample_token``: temperature 0 is the argmax; otherwise draws follow softmax(logits / T) restricted
to the top-p nucleus (the smallest most-likely set with mass >= top_p), and a seed repeats them."""

from __future__ import annotations

import math

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.runtime.generate import sample_token


def _freqs(logits, n=4000, seed=0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sample_token(logits, generator=g, **kw)] += 1
    return counts / n


def test_temperature_zero_is_the_argmax():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    assert sample_token(logits, 0.0, 0.5) == int(logits.argmax())


def test_draws_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    want = torch.softmax(logits / 2.0, -1)
    got = _freqs(logits, temperature=2.0)
    tol = 4 * torch.sqrt(want * (1 - want) / 4000)  # 4 standard errors
    assert ((got - want).abs() <= tol).all(), (got, want)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = p.log()
    got = _freqs(logits, temperature=1.0, top_p=0.8)  # 0.5 + 0.3 reach 0.8: tokens 1 and 3 only
    assert got[0] == 0 and got[2] == 0
    assert abs(got[1] - 0.5 / 0.8) < 0.05 and abs(got[3] - 0.3 / 0.8) < 0.05
    got = _freqs(logits, n=500, temperature=1.0, top_p=0.81)  # 0.8 < 0.81: token 2 joins
    assert got[2] > 0 and got[0] == 0
    assert (_freqs(logits, n=200, temperature=1.0, top_p=1e-9) == torch.tensor([0.0, 1.0, 0.0, 0.0])).all()


def test_a_seed_repeats_the_draws():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_token(logits, 1.0, 0.9, g) for _ in range(50)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


@pytest.mark.parametrize("temperature,top_p", [(-0.5, 1.0), (1.0, 0.0), (1.0, 1.5), (1.0, math.nan)])
def test_bad_parameters_raise(temperature, top_p):
    with pytest.raises(SparselandError, match="top_p"):
        sample_token(torch.zeros(4), temperature, top_p)
