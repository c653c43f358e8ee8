"""What makes zeros fast: sparse checkpoints, formats and kernels, modules, a lean decode loop."""

from sparseland.runtime.checkpoint import load_sparse_checkpoint, save_sparse_checkpoint
from sparseland.runtime.generate import greedy_generate
from sparseland.runtime.kernels import force_reference
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_

__all__ = [
    "SparseLinear",
    "force_reference",
    "greedy_generate",
    "load_sparse_checkpoint",
    "save_sparse_checkpoint",
    "to_sparse_runtime_",
]
