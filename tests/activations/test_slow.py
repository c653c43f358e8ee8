"""The real embedded model (slow): TEAL hits its target sparsity and costs little perplexity at 25%."""

from __future__ import annotations

import pytest

from sparseland import sparsify_
from sparseland.activations import TEALConfig, measure_sparsity, remove
from sparseland.data import load_corpus
from sparseland.evaluate import perplexity


@pytest.mark.slow
def test_teal_on_the_embedded_model(embedded) -> None:
    model, tok = embedded
    corpus = load_corpus(tok)
    ev, calib = corpus.evaluation(256, 2), corpus.calibration(4, 256, seed=0)
    dense = perplexity(model, ev, seq_len=256, progress=False).perplexity
    try:
        sparsify_(model, TEALConfig(sparsity=0.25), calibration=calib)
        measured = measure_sparsity(model, calib[:2])
        assert all(abs(v - 0.25) < 0.08 for v in measured.values())
        sparse = perplexity(model, ev, seq_len=256, progress=False).perplexity
        assert 0.9 * dense < sparse < 1.25 * dense
    finally:
        remove(model)
