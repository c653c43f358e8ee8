import copy
import math

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.evaluate import perplexity
from sparseland.evaluate.agreement import agreement, compare, kl_top1
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_top1_hand_computed():
    # position 0: p_ref = (1/2, 1/4, 1/4), p = (1/4, 1/2, 1/4): KL = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2)/4;
    # argmaxes 0 and 1 differ. position 1: identical distributions: KL 0, same argmax.
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1]]))
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.7, 0.1]])) + torch.tensor([[3.0], [-1.0]])  # shifts
    kl, same = kl_top1(ref, logits)
    assert kl[0].item() == pytest.approx(math.log(2) / 4, rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert same.tolist() == [False, True]


def test_kl_top1_asymmetric_direction():
    # KL(ref || model) with ref = (0.9, 0.1), model = (0.5, 0.5): 0.9 ln 1.8 + 0.1 ln 0.2
    ref, logits = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.5, 0.5]))
    kl, _ = kl_top1(ref, logits)
    assert kl.item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-6)


def test_against_itself_is_zero(tiny_llama):
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    res = agreement(copy.deepcopy(tiny_llama), tiny_llama, tokens, seq_len=40, progress=False)
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6) and res.kl_p99 == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0
    assert res.n_tokens == 5 * 39 and res.n_windows == 5
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-6)


def test_matches_full_logits_computation(tiny_llama):
    other = make_tiny_llama(seed=1)
    windows = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_llama(windows).logits[:, :-1].reshape(-1, 256)
        lg = other(windows).logits[:, :-1].reshape(-1, 256)
    p = torch.softmax(ref.double(), -1)
    kl = (p * (torch.log(p) - torch.log_softmax(lg.double(), -1))).sum(-1)
    agree = (ref.argmax(-1) == lg.argmax(-1)).double().mean()
    out = compare({"a": other, "b": other}, tiny_llama, windows, batch_size=2, progress=False)
    for res in out.values():
        assert res.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
        assert res.kl_p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-4)
        assert res.kl_max == pytest.approx(kl.max().item(), rel=1e-4)
        assert res.top1_agreement == pytest.approx(agree.item())
        assert res.top1_agreement < 1  # two random models do not agree everywhere
    ppl = perplexity(other, windows, seq_len=30, progress=False).perplexity
    assert out["a"].perplexity == pytest.approx(ppl, rel=1e-5)
    assert out["a"].reference_perplexity == pytest.approx(
        perplexity(tiny_llama, windows, seq_len=30, progress=False).perplexity, rel=1e-5
    )


def test_batch_size_does_not_change_the_result(tiny_llama):
    other = make_tiny_llama(seed=2)
    tokens = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    a = agreement(other, tiny_llama, tokens, seq_len=50, batch_size=1, progress=False)
    b = agreement(other, tiny_llama, tokens, seq_len=50, batch_size=4, progress=False)
    assert a.kl_mean == pytest.approx(b.kl_mean, rel=1e-5) and a.top1_agreement == b.top1_agreement


def test_vocab_mismatch_is_a_clear_error(tiny_llama):
    with pytest.raises(SparselandError, match="vocabulary of 300"):
        agreement(make_tiny_llama(vocab=300), tiny_llama, torch.randint(0, 256, (100,)), seq_len=20, progress=False)


def test_too_long_windows_rejected(tiny_llama):
    with pytest.raises(SparselandError, match="context of"):
        agreement(make_tiny_llama(seed=1), tiny_llama, torch.randint(0, 256, (1000,)), seq_len=512, progress=False)
