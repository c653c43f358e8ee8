import math

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.evaluate import perplexity


def test_matches_transformers_labels_loss(tiny_llama):
    torch.manual_seed(0)
    windows = torch.randint(0, 256, (5, 33))
    res = perplexity(tiny_llama, windows, seq_len=33, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = sum(losses) / len(losses)  # equal-length windows: mean of means == mean over tokens
    assert res.nll == pytest.approx(expected, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert res.n_tokens == 5 * 32 and res.n_windows == 5


def test_batch_size_does_not_change_the_result(tiny_llama):
    tokens = torch.randint(0, 256, (400,))
    a = perplexity(tiny_llama, tokens, seq_len=50, batch_size=1, progress=False)
    b = perplexity(tiny_llama, tokens, seq_len=50, batch_size=8, progress=False)
    assert a.n_windows == 8
    assert a.nll == pytest.approx(b.nll, rel=1e-5)


def test_seq_len_longer_than_context_is_rejected(tiny_llama):
    with pytest.raises(SparselandError, match="context of 256"):
        perplexity(tiny_llama, torch.randint(0, 256, (1000,)), seq_len=512, progress=False)


@pytest.mark.parametrize("field", ["seq_len", "batch_size"])
def test_non_positive_sizes(tiny_llama, field):
    kwargs = {"seq_len": 16, "batch_size": 2, field: 0}
    with pytest.raises(SparselandError, match=field):
        perplexity(tiny_llama, torch.randint(0, 256, (100,)), progress=False, **kwargs)
