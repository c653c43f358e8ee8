"""Weight sparsity: scores, masks and N:M patterns, the pruning algorithms (magnitude, random, Wanda,
SparseGPT, DSnoT) and OWL's layer-wise allocation, applied with ``sparsify_``::

    sparsify_(model, WandaConfig(sparsity=0.5, pattern="2:4"), calibration=corpus.calibration(64, 512))
"""

from sparseland.weights.config import (
    DSnoTConfig,
    MagnitudeConfig,
    PruningConfig,
    RandomConfig,
    SparseGPTConfig,
    WandaConfig,
    parse_pattern,
)
from sparseland.weights.dsnot import dsnot_refine, reconstruction_error
from sparseland.weights.masks import (
    is_nm,
    magnitude_scores,
    nm_mask,
    random_scores,
    unstructured_mask,
    wanda_scores,
)
from sparseland.weights.owl import outlier_ratio, owl_allocation
from sparseland.weights.pruner import PruningReport, prune_model
from sparseland.weights.sparsegpt import sparsegpt_prune

__all__ = [
    "DSnoTConfig",
    "MagnitudeConfig",
    "PruningConfig",
    "PruningReport",
    "RandomConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "dsnot_refine",
    "is_nm",
    "magnitude_scores",
    "nm_mask",
    "outlier_ratio",
    "owl_allocation",
    "parse_pattern",
    "prune_model",
    "random_scores",
    "reconstruction_error",
    "sparsegpt_prune",
    "unstructured_mask",
    "wanda_scores",
]
