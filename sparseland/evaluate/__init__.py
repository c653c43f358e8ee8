"""Evaluation: perplexity and long-context accuracy (RULER-style suite)."""

from sparseland.evaluate.longctx import LongCtxResult, evaluate_longctx
from sparseland.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["LongCtxResult", "PerplexityResult", "evaluate_longctx", "perplexity"]
