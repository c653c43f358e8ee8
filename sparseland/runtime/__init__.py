"""What makes zeros fast: sparse checkpoints, formats and kernels, modules, a lean decode loop."""

from sparseland.runtime.checkpoint import load_sparse_checkpoint, save_sparse_checkpoint
from sparseland.runtime.experts import ExpertList, experts_to_sparse_runtime_, split_experts_
from sparseland.runtime.generate import greedy_generate
from sparseland.runtime.kernels import force_reference
from sparseland.runtime.modules import SparseLinear, to_sparse_runtime_

__all__ = [
    "ExpertList",
    "SparseLinear",
    "experts_to_sparse_runtime_",
    "force_reference",
    "greedy_generate",
    "load_sparse_checkpoint",
    "save_sparse_checkpoint",
    "split_experts_",
    "to_sparse_runtime_",
]
