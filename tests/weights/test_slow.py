"""The real embedded model (slow): Wanda 50% runs and stays sane; the `prune` command end to end."""

import math

import pytest
import torch

from sparseland import load_corpus, perplexity, sparsify_
from sparseland.weights import WandaConfig
from tests.conftest import make_tiny_llama


@pytest.mark.slow
def test_wanda_half_on_embedded_model(embedded):
    model, tokenizer = embedded
    model = type(model)(model.config).eval()
    model.load_state_dict(embedded[0].state_dict())  # a private copy: the fixture is session-wide
    corpus = load_corpus(tokenizer)
    ev = corpus.evaluation(256, 4)
    dense = perplexity(model, ev, seq_len=256, progress=False).perplexity
    report = sparsify_(model, WandaConfig(sparsity=0.5), calibration=corpus.calibration(4, 256, seed=0))
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(model.lm_head.weight, embedded[0].lm_head.weight)  # (the Q4_1 weights hold zeros)
    assert torch.equal(model.model.embed_tokens.weight, embedded[0].model.embed_tokens.weight)
    ppl = perplexity(model, ev, seq_len=256, progress=False).perplexity
    assert math.isfinite(ppl) and dense < ppl < 4 * dense


@pytest.mark.slow
def test_prune_command_end_to_end(embedded, tmp_path):
    """`sparseland prune` on a tiny model saved with the embedded tokenizer; it loads back sparse."""
    from sparseland.cli import main
    from sparseland.models import load_model

    _, tokenizer = embedded
    src = tmp_path / "tiny"
    tiny = make_tiny_llama(vocab=len(tokenizer), max_pos=512)
    tiny.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            str(src),
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--calib-samples",
            "2",
            "--seq-len",
            "64",
            "--max-windows",
            "2",
            "--eval",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    model, _ = load_model(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
