"""Sparse parameter-efficient fine-tuning: SpIEL, SHiRA, LIFT, S2FT, sparse + low-rank, and LoRA (via
Hugging Face peft) as the baseline; adapters as small files that merge and unmerge exactly, and that
keep a pruned model's zeros.

    result = train_adapter(model, SpIELConfig(budget=0.003), windows, steps=100)
    save_adapter(result.adapter, "adapter.safetensors")
    record = merge_adapter_(model, result.adapter)   # ... use the merged model ...
    unmerge_adapter_(model, record)                  # the base bits again
"""

from sparseland.peft.adapter import (
    Adapter,
    LowRankDelta,
    MergeRecord,
    TensorDelta,
    load_adapter,
    merge_adapter_,
    save_adapter,
    unmerge_adapter_,
)
from sparseland.peft.configs import (
    METHODS,
    LIFTConfig,
    LoRAConfig,
    PeftConfig,
    S2FTConfig,
    SHiRAConfig,
    SparseLoRAConfig,
    SpIELConfig,
    make_config,
)
from sparseland.peft.train import TrainResult, parameter_count, train_adapter

__all__ = [
    "METHODS",
    "Adapter",
    "LIFTConfig",
    "LoRAConfig",
    "LowRankDelta",
    "MergeRecord",
    "PeftConfig",
    "S2FTConfig",
    "SHiRAConfig",
    "SparseLoRAConfig",
    "SpIELConfig",
    "TensorDelta",
    "TrainResult",
    "load_adapter",
    "make_config",
    "merge_adapter_",
    "parameter_count",
    "save_adapter",
    "train_adapter",
    "unmerge_adapter_",
]
