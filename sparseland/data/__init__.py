"""Text corpora: the embedded default text or a user file, tokenized and split into calibration and
evaluation parts that never overlap; RULER-style long-context samples generated from a seed."""

from sparseland.data.longctx import TASKS as LONGCTX_TASKS
from sparseland.data.longctx import LongCtxSample, generate_samples, score_all, score_part
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
    "LONGCTX_TASKS",
    "LongCtxSample",
    "generate_samples",
    "score_all",
    "score_part",
    "Corpus",
    "calibration_windows",
    "embedded_text",
    "eval_windows",
    "load_corpus",
    "read_text_file",
    "split_tokens",
    "tokenize_text",
]
