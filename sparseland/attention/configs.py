"""One config per sparse-attention method. Budgets are fractions so one config fits every length:

* prefill patterns decide, per head, which (query block, key block) pairs are computed;
* decode selections decide, per head and step, which cached keys the new token attends (SnapKV and
  H2O: per KV head, which entries the KV cache keeps).

    sparsify_(model, VerticalSlashConfig(vertical=0.05, slash=0.05))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError


def _fraction(name: str, value: float, *, zero_ok: bool = False) -> None:
    lo_ok = value >= 0 if zero_ok else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo_ok and value <= 1):
        bound = "[0, 1]" if zero_ok else "(0, 1]"
        raise SparselandError(f"{name}={value!r} must be a fraction in {bound}, e.g. 0.1 (1.0 keeps everything)")


def _int(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise SparselandError(f"{name}={value!r} must be an integer >= {lo}")


@dataclass
class AttentionConfig(SparsityConfig):
    """Base of the sparse-attention configs (batch size 1; Llama-style models)."""

    phase: ClassVar[str] = "prefill"


@dataclass
class PrefillConfig(AttentionConfig):
    """Prefill patterns work on ``block_size`` x ``block_size`` tiles of the attention matrix."""

    block_size: int = 64

    def validate(self) -> None:
        _int("block_size", self.block_size, 1)


@dataclass
class StreamingConfig(PrefillConfig):
    """A-shape / StreamingLLM: ``sink`` tokens (rounded up to blocks) + a local window of ``window``
    (fraction of the sequence's blocks, at least one block)."""

    kind: ClassVar[str] = "streaming"
    sink: int = 64
    window: float = 0.1

    def validate(self) -> None:
        super().validate()
        _int("sink", self.sink, 0)
        _fraction("window", self.window)


@dataclass
class VerticalSlashConfig(PrefillConfig):
    """MInference vertical-slash: keep ``vertical`` / ``slash`` fractions of key-block columns /
    block diagonals, ranked by the last ``last_q`` queries' attention."""

    kind: ClassVar[str] = "vertical_slash"
    last_q: int = 64
    vertical: float = 0.05
    slash: float = 0.05

    def validate(self) -> None:
        super().validate()
        _int("last_q", self.last_q, 1)
        _fraction("vertical", self.vertical)
        _fraction("slash", self.slash)


@dataclass
class BlockSparseConfig(PrefillConfig):
    """MInference block-sparse: each query block keeps the top ``keep`` fraction of its causal key
    blocks by mean-pooled q . k."""

    kind: ClassVar[str] = "block_sparse"
    keep: float = 0.1
    sink_blocks: int = 0  # key blocks always kept (attention sinks); 0 = pure top-k as in MInference

    def validate(self) -> None:
        super().validate()
        _fraction("keep", self.keep)
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise SparselandError(f"sink_blocks={self.sink_blocks!r} must be an integer >= 0 (e.g. 1)")


@dataclass
class FlexPrefillConfig(PrefillConfig):
    """FlexPrefill: cumulative attention ``gamma``, divergence threshold ``tau`` (sqrt JS) choosing
    query-aware vs vertical-slash per head; ``max_density`` caps each query block's share of blocks."""

    kind: ClassVar[str] = "flexprefill"
    gamma: float = 0.9
    tau: float = 0.1
    max_density: float = 1.0

    def validate(self) -> None:
        super().validate()
        _fraction("gamma", self.gamma)
        _fraction("tau", self.tau, zero_ok=True)
        _fraction("max_density", self.max_density)


@dataclass
class XAttentionConfig(PrefillConfig):
    """XAttention: antidiagonal scores with ``stride``; keep blocks until their share reaches
    ``threshold``; ``max_density`` caps each query block's share of blocks."""

    kind: ClassVar[str] = "xattention"
    threshold: float = 0.9
    stride: int = 8
    max_density: float = 1.0

    def validate(self) -> None:
        super().validate()
        _int("stride", self.stride, 1)
        if self.block_size % self.stride:
            raise SparselandError(f"stride={self.stride} must divide block_size={self.block_size}, e.g. stride=8")
        _fraction("threshold", self.threshold)
        _fraction("max_density", self.max_density)


@dataclass
class DecodeConfig(AttentionConfig):
    """Decode selections: ``keep`` is the fraction of cached keys each decode step attends."""

    phase: ClassVar[str] = "decode"
    keep: float = 0.1

    def validate(self) -> None:
        _fraction("keep", self.keep)


@dataclass
class QuestConfig(DecodeConfig):
    """Quest: pages of ``page_size`` keys, top pages by the min/max upper bound of q . k; the first
    ``dense_layers`` layers attend densely (as in the paper).

    ``refine`` > 1 adds a token-level second stage (ours, not the paper's): the top ``refine`` x the
    page budget pages are candidates, their keys are scored exactly (q . k) and the new token attends
    the best ``page budget x page_size`` of them, so it attends as many keys as plain Quest but scores
    ``refine`` times as many. ``refine=1`` is plain Quest."""

    kind: ClassVar[str] = "quest"
    page_size: int = 16
    dense_layers: int = 2
    refine: float = 1.0

    def validate(self) -> None:
        super().validate()
        _int("page_size", self.page_size, 1)
        _int("dense_layers", self.dense_layers, 0)
        if isinstance(self.refine, bool) or not isinstance(self.refine, (int, float)) or self.refine < 1:
            raise SparselandError(f"refine={self.refine!r} must be a number >= 1 (1: plain Quest; 4: 4x the pages)")


@dataclass
class TidalDecodeConfig(DecodeConfig):
    """TidalDecode: layers < ``dense_layers`` dense; full attention at ``dense_layers`` and at
    ``reselect_layer`` (default: the middle layer) picks the top tokens that the following layers reuse.
    Each head keeps its own top tokens, as in the paper's code; ``share_heads`` selects one set for all
    heads instead (the union of the heads' rankings, rank by rank, cut to the same budget)."""

    kind: ClassVar[str] = "tidaldecode"
    dense_layers: int = 2
    reselect_layer: int | None = None
    share_heads: bool = False

    def validate(self) -> None:
        super().validate()
        _int("dense_layers", self.dense_layers, 0)
        if self.reselect_layer is not None:
            _int("reselect_layer", self.reselect_layer, self.dense_layers)
        if not isinstance(self.share_heads, bool):
            raise SparselandError(f"share_heads={self.share_heads!r} must be True or False")


@dataclass
class TopKDecodeConfig(DecodeConfig):
    """Exact top-k (the oracle the decode selections approximate): every layer from ``dense_layers`` on
    scores all cached keys and attends only each head's ``keep`` share with the highest scores. It
    reads every key, so it saves no time; it is the accuracy ceiling for a selection at that budget."""

    kind: ClassVar[str] = "topk"
    dense_layers: int = 2

    def validate(self) -> None:
        super().validate()
        _int("dense_layers", self.dense_layers, 0)


@dataclass
class SnapKVConfig(DecodeConfig):
    """SnapKV (Li et al. 2024): after prefill keep the prompt tokens most attended by the last ``window``
    queries (scores max-pooled over ``kernel``) plus the window; ``keep`` is the share of the prompt.
    Selection is per KV head (``group``: "sum" the group's votes, or the "union" of its query heads'
    rankings), or per "query" head (a cache row per query head: G times the memory of the others);
    the lean loop evicts the rest of the cache."""

    kind: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7
    group: str = "sum"

    def validate(self) -> None:
        super().validate()
        _int("window", self.window, 1)
        _int("kernel", self.kernel, 1)
        if self.group not in ("sum", "union", "query"):
            raise SparselandError(
                f"group={self.group!r} must be 'sum', 'union' (how a KV head's query heads vote) or 'query' "
                "(a cache row per query head)"
            )
        if self.kernel % 2 == 0:
            raise SparselandError(f"kernel={self.kernel} must be odd (a centred pooling window), e.g. 7")


@dataclass
class H2OConfig(DecodeConfig):
    """H2O (Zhang et al. 2023): a cache of ``keep`` x length tokens: heavy hitters by accumulated attention
    plus the most recent ``recent`` share of the budget; the lowest-scored older token is evicted.
    Selection is per KV head (the group's scores summed); the lean loop evicts physically."""

    kind: ClassVar[str] = "h2o"
    recent: float = 0.5

    def validate(self) -> None:
        super().validate()
        _fraction("recent", self.recent, zero_ok=True)


def parse_fields(items: list[str], flag: str = "--set") -> dict:
    """``["share_heads=true", "kernel=15"]`` -> ``{"share_heads": True, "kernel": 15}`` (values as JSON,
    else strings); ``flag`` names the option in the error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SparselandError(f"{flag} {item!r}: write KEY=VALUE, e.g. share_heads=true")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_method_spec(spec: str, common: dict | None = None, flag: str = "--methods") -> tuple[str, dict]:
    """``"quest:page_size=4,refine=4"`` -> ``("quest", {**common, "page_size": 4, "refine": 4})``: a method
    name with its own config fields, for command lines that take several methods."""
    name, _, fields = spec.partition(":")
    own = parse_fields([f for f in fields.split(",") if f], flag=f"{flag} {spec!r}:") if fields else {}
    return name, {**(common or {}), **own}
