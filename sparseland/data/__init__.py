"""Text corpora: the embedded default text or a user file, tokenized and split into calibration and
evaluation parts that never overlap."""

from sparseland.data.text import (
    Corpus,
    calibration_windows,
    embedded_text,
    eval_windows,
    load_corpus,
    read_text_file,
    split_tokens,
    tokenize_text,
)

__all__ = [
    "Corpus",
    "calibration_windows",
    "embedded_text",
    "eval_windows",
    "load_corpus",
    "read_text_file",
    "split_tokens",
    "tokenize_text",
]
