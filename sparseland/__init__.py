"""sparseland: make transformer models sparse and turn the sparsity into measured CPU speed and size."""

from sparseland.api import register, sparsify_
from sparseland.config import SparsityConfig
from sparseland.data import load_corpus
from sparseland.errors import SparselandError
from sparseland.evaluate import perplexity
from sparseland.models import load_model

__version__ = "0.1.0"

__all__ = [
    "SparselandError",
    "SparsityConfig",
    "load_corpus",
    "load_model",
    "perplexity",
    "register",
    "sparsify_",
]
