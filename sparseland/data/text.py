"""The embedded text (CPython's ``pydoc_data.topics``), user text files, and the calibration /
evaluation split.

The split is by token position and does not depend on the window length: the first
``1 - eval_fraction`` of the tokens are the calibration part, the rest the evaluation part.
Calibration windows are sampled at seeded random offsets inside the calibration part (as the Wanda
and SparseGPT reference code sample C4); evaluation windows tile the evaluation part without overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparseland.errors import SparselandError

DEFAULT_EVAL_FRACTION = 0.25


def embedded_text() -> str:
    """CPython's language reference topics, in sorted topic order, as one string."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with a clear error when it is missing, unreadable or empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SparselandError(f"text file {str(p)!r} does not exist; pass an existing UTF-8 text file")
    if not p.is_file():
        raise SparselandError(f"text path {str(p)!r} is not a file; pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SparselandError(f"text file {str(p)!r} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc
    if not text.strip():
        raise SparselandError(f"text file {str(p)!r} is empty; pass a file with some text in it")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(tokens: torch.Tensor, eval_fraction: float = DEFAULT_EVAL_FRACTION):
    """Split a 1-D token stream into (calibration, evaluation) parts that never overlap."""
    if not 0 < eval_fraction < 1:
        raise SparselandError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    n_eval = int(round(len(tokens) * eval_fraction))
    cut = len(tokens) - n_eval
    return tokens[:cut], tokens[cut:]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise SparselandError(f"{name}={value!r} must be a positive integer")


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``(n_samples, seq_len)`` windows at seeded random offsets inside ``tokens``."""
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    if len(tokens) < seq_len:
        raise SparselandError(
            f"the calibration text has {len(tokens)} tokens, fewer than seq_len={seq_len}; "
            "use a longer text or a smaller --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``(n, seq_len)`` consecutive non-overlapping windows tiling ``tokens`` (the tail is dropped)."""
    _check_positive("seq_len", seq_len)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    n = len(tokens) // seq_len
    if n == 0:
        raise SparselandError(
            f"the evaluation text has {len(tokens)} tokens, fewer than seq_len={seq_len}; "
            "use a longer text or a smaller --seq-len"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)


@dataclass
class Corpus:
    """A tokenized text and its two disjoint parts."""

    name: str
    tokens: torch.Tensor  # (N,)
    calib: torch.Tensor  # (N_calib,) the first part
    eval: torch.Tensor  # (N_eval,)  the last part

    def calibration(self, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
        return calibration_windows(self.calib, n_samples, seq_len, seed)

    def evaluation(self, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
        return eval_windows(self.eval, seq_len, max_windows)


def load_corpus(tokenizer, text_path: str | Path | None = None, eval_fraction: float = DEFAULT_EVAL_FRACTION):
    """Tokenize the embedded text (or ``text_path``) and split it into calibration and evaluation."""
    if text_path is None:
        name, text = "pydoc_data.topics", embedded_text()
    else:
        name, text = str(text_path), read_text_file(text_path)
    tokens = tokenize_text(tokenizer, text)
    if len(tokens) < 4:
        raise SparselandError(f"text {name!r} has only {len(tokens)} tokens; pass a longer text")
    calib, ev = split_tokens(tokens, eval_fraction)
    return Corpus(name=name, tokens=tokens, calib=calib, eval=ev)
