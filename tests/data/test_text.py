import pytest
import torch

from sparseland.data import (
    calibration_windows,
    embedded_text,
    eval_windows,
    load_corpus,
    read_text_file,
    split_tokens,
)
from sparseland.errors import SparselandError


class CharTokenizer:
    """A stand-in tokenizer: one token per byte."""

    def __call__(self, text, **kwargs):
        return {"input_ids": list(text.encode("utf-8"))}


def test_embedded_text_is_deterministic_and_long():
    a, b = embedded_text(), embedded_text()
    assert a == b
    assert len(a) > 300_000


def test_split_is_disjoint_and_complete():
    tokens = torch.arange(1000)
    calib, ev = split_tokens(tokens, eval_fraction=0.25)
    assert len(ev) == 250 and len(calib) == 750
    assert set(calib.tolist()).isdisjoint(ev.tolist())
    assert torch.equal(torch.cat([calib, ev]), tokens)


def test_calibration_windows_stay_inside_calibration_part_and_are_seeded():
    tokens = torch.arange(2000)
    calib, ev = split_tokens(tokens)
    w1 = calibration_windows(calib, 16, 32, seed=3)
    w2 = calibration_windows(calib, 16, 32, seed=3)
    w3 = calibration_windows(calib, 16, 32, seed=4)
    assert w1.shape == (16, 32)
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert int(w1.max()) < int(ev.min())
    # each window is a contiguous run of the stream
    assert torch.all(w1[:, 1:] - w1[:, :-1] == 1)


def test_eval_windows_tile_without_overlap():
    w = eval_windows(torch.arange(100), 16)
    assert w.shape == (6, 16)
    assert torch.equal(w.flatten(), torch.arange(96))
    assert eval_windows(torch.arange(100), 16, max_windows=2).shape == (2, 16)


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_sizes_are_rejected(bad):
    with pytest.raises(SparselandError, match="positive"):
        eval_windows(torch.arange(100), bad)
    with pytest.raises(SparselandError, match="positive"):
        calibration_windows(torch.arange(100), bad, 8)


def test_too_short_text_is_rejected():
    with pytest.raises(SparselandError, match="fewer than seq_len"):
        eval_windows(torch.arange(10), 16)


def test_missing_and_empty_text_files(tmp_path):
    with pytest.raises(SparselandError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SparselandError, match="empty"):
        read_text_file(empty)
    with pytest.raises(SparselandError, match="not a file"):
        read_text_file(tmp_path)


def test_user_text_corpus(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello sparse world " * 50)
    corpus = load_corpus(CharTokenizer(), f)
    assert len(corpus.calib) + len(corpus.eval) == len(corpus.tokens) == len(f.read_bytes())
    assert corpus.evaluation(seq_len=16).shape[1] == 16
