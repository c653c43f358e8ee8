"""sparseland: make transformer models sparse and turn the sparsity into measured CPU speed and size."""

from sparseland.api import register, sparsify_
from sparseland.attention import (
    BlockSparseConfig,
    FlexPrefillConfig,
    H2OConfig,
    QuestConfig,
    SnapKVConfig,
    StreamingConfig,
    TidalDecodeConfig,
    TopKDecodeConfig,
    VerticalSlashConfig,
    XAttentionConfig,
)
from sparseland.bench import run_frontier
from sparseland.config import SparsityConfig
from sparseland.data import load_corpus
from sparseland.errors import SparselandError
from sparseland.evaluate import agreement, evaluate_longctx, evaluate_tasks, perplexity, task_suite
from sparseland.models import load_model
from sparseland.moe import MoEfyConfig
from sparseland.quant import QuantConfig, QuantScheme
from sparseland.registry import make_config
from sparseland.runtime import (
    greedy_generate,
    load_sparse_checkpoint,
    save_sparse_checkpoint,
    to_sparse_runtime_,
)
from sparseland.training import (
    FinetuneConfig,
    GMPConfig,
    ProgressiveGradientFlowConfig,
    RigLConfig,
    SETConfig,
    SRSTEConfig,
    StaticConfig,
    sparse_soup,
)
from sparseland.training.finetune import finetune
from sparseland.weights import (
    DSnoTConfig,
    MagnitudeConfig,
    RandomConfig,
    SparseGPTConfig,
    WandaConfig,
)

__version__ = "0.1.0"

__all__ = [
    "agreement",
    "evaluate_tasks",
    "task_suite",
    "BlockSparseConfig",
    "FlexPrefillConfig",
    "H2OConfig",
    "QuestConfig",
    "QuantConfig",
    "QuantScheme",
    "SnapKVConfig",
    "StreamingConfig",
    "TidalDecodeConfig",
    "TopKDecodeConfig",
    "VerticalSlashConfig",
    "XAttentionConfig",
    "FinetuneConfig",
    "GMPConfig",
    "ProgressiveGradientFlowConfig",
    "RigLConfig",
    "SETConfig",
    "SRSTEConfig",
    "StaticConfig",
    "finetune",
    "sparse_soup",
    "DSnoTConfig",
    "MagnitudeConfig",
    "MoEfyConfig",
    "RandomConfig",
    "SparseGPTConfig",
    "SparselandError",
    "SparsityConfig",
    "WandaConfig",
    "evaluate_longctx",
    "greedy_generate",
    "load_corpus",
    "load_model",
    "load_sparse_checkpoint",
    "make_config",
    "perplexity",
    "register",
    "run_frontier",
    "save_sparse_checkpoint",
    "sparsify_",
    "to_sparse_runtime_",
]
