"""Evaluation: perplexity (and, as they land, long-context accuracy)."""

from sparseland.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
