"""Sparse attention for long context: prefill patterns (which query/key blocks are computed) and decode
selections / KV-cache eviction (which cached keys a new token attends). Batch size 1.

    from sparseland.attention import make_config, measured_sparsity, remove
    sparsify_(model, make_config("vertical_slash", 0.9))
    model(ids); greedy_generate(model, ids)          # both use the method
    measured_sparsity(model); remove(model)          # back to dense

Prefill: ``streaming`` (A-shape), ``vertical_slash`` and ``block_sparse`` (MInference), ``flexprefill``,
``xattention``; per-head patterns from an offline search (``search_head_patterns``, MoA style).
Decode: ``quest``, ``tidaldecode``, ``snapkv``, ``h2o``; ``topk`` is exact top-k attention, the accuracy
ceiling of a selection at the same budget (it scores every key, so it saves no time).
"""

from __future__ import annotations

import math

import torch

from sparseland.attention.configs import (
    AttentionConfig,
    BlockSparseConfig,
    DecodeConfig,
    FlexPrefillConfig,
    H2OConfig,
    PrefillConfig,
    QuestConfig,
    SnapKVConfig,
    StreamingConfig,
    TidalDecodeConfig,
    TopKDecodeConfig,
    VerticalSlashConfig,
    XAttentionConfig,
)
from sparseland.attention.hf import apply_attention, attention_method, remove
from sparseland.attention.methods import SparseAttention
from sparseland.attention.search import (
    HeadPatternConfig,
    load_head_patterns,
    save_head_patterns,
    search_head_patterns,
)
from sparseland.config import check_fraction
from sparseland.errors import SparselandError

CONFIGS: dict[str, type[AttentionConfig]] = {
    c.kind: c
    for c in (
        StreamingConfig,
        VerticalSlashConfig,
        BlockSparseConfig,
        FlexPrefillConfig,
        XAttentionConfig,
        QuestConfig,
        TidalDecodeConfig,
        SnapKVConfig,
        H2OConfig,
        TopKDecodeConfig,
    )
}
METHODS: tuple[str, ...] = tuple(CONFIGS)


def make_config(name: str, sparsity: float, **overrides) -> AttentionConfig:
    """A config of method ``name`` aimed at ``sparsity`` (fraction of attention skipped; 0 = dense).

    The target density is ``d = 1 - sparsity`` of causal query-key pairs (prefill methods) or of
    cached keys per decode step (decode methods):

    * block_sparse: ``keep = d`` of each query block's causal key blocks (exact up to rounding);
    * streaming: window fraction ``w = 1 - sqrt(1 - d)`` of the blocks (an A-shape band of width w
      covers ``2w - w^2`` of a causal square), plus 64 sink tokens;
    * vertical_slash: ``vertical = slash = (1 - sqrt(1 - d)) / 2`` (columns near the sink and
      diagonals near the main one each cover about a band; 1 at sparsity 0);
    * flexprefill (gamma 0.9, tau 0.1) and xattention (threshold 0.9): adaptive, so ``d`` is a cap,
      ``max_density = d`` per query block, and the measured sparsity can be higher than asked
      (at sparsity 0 the cumulative threshold is 1: dense);
    * quest, tidaldecode, snapkv, h2o, topk: ``keep = d`` of the cached keys.

    The patterns work on blocks, so the measured sparsity (``measured_sparsity``) is what to report.
    """
    if name not in CONFIGS:
        raise SparselandError(f"unknown attention method {name!r}; choose from {list(METHODS)}")
    check_fraction("sparsity", sparsity)
    d = 1.0 - sparsity
    band = 1.0 - math.sqrt(1.0 - d)
    vs = 1.0 if d >= 1 else max(band / 2, 1e-6)
    cumulative = 1.0 if d >= 1 else 0.9  # at sparsity 0 the adaptive methods keep everything
    params = {
        "streaming": {"window": max(band, 1e-6)},
        "vertical_slash": {"vertical": vs, "slash": vs},
        "block_sparse": {"keep": max(d, 1e-6)},
        "flexprefill": {"max_density": max(d, 1e-6), "gamma": cumulative},
        "xattention": {"max_density": max(d, 1e-6), "threshold": cumulative},
    }.get(name, {"keep": max(d, 1e-6)})
    return CONFIGS[name](**{**params, **overrides})


def measured_sparsity(model: torch.nn.Module, phase: str | None = None) -> float:
    """Fraction of attention the model's method skipped since it was applied (or ``reset_sparsity``):
    causal query-key pairs in prefill, cached keys in decode (default: the method's own phase)."""
    state = attention_method(model)
    if state is None:
        raise SparselandError("the model has no sparse attention method; apply one with sparsify_ first")
    if phase not in (None, "prefill", "decode"):
        raise SparselandError(f"phase={phase!r} must be 'prefill', 'decode' or None")
    return state.sparsity(phase)


def reset_sparsity(model: torch.nn.Module) -> None:
    """Zero the skipped/total counters behind ``measured_sparsity``."""
    state = attention_method(model)
    if state is not None:
        state.reset_stats()


__all__ = [
    "CONFIGS",
    "METHODS",
    "AttentionConfig",
    "BlockSparseConfig",
    "DecodeConfig",
    "FlexPrefillConfig",
    "H2OConfig",
    "HeadPatternConfig",
    "PrefillConfig",
    "QuestConfig",
    "SnapKVConfig",
    "SparseAttention",
    "StreamingConfig",
    "TidalDecodeConfig",
    "TopKDecodeConfig",
    "VerticalSlashConfig",
    "XAttentionConfig",
    "apply_attention",
    "attention_method",
    "load_head_patterns",
    "make_config",
    "measured_sparsity",
    "remove",
    "reset_sparsity",
    "save_head_patterns",
    "search_head_patterns",
]
