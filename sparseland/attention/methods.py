"""``SparseAttention``: the per-model object that runs one method's attention for every layer.

Both integrations call ``attend(layer, q, k, v, scale)`` with batch size 1, ``q`` (H, T, D) for the
last ``T`` positions and ``k``/``v`` (KVH, S, D) for all ``S`` cached positions:

* prefill (T == S > 1): a prefill pattern builds a block mask -> ``block_sparse_attention``;
  decode methods attend densely and SnapKV / H2O choose the tokens they keep;
* decode (T == 1): a decode method picks positions -> ``sparse_decode_attention``;
* anything else (a multi-token continuation of a cache) runs dense causal attention.

SnapKV and H2O evict KV-cache entries, chosen per KV head (KVH, K). Through transformers (whose cache
keeps everything) decode gathers the kept entries with indices expanded to the H query heads; a
runtime with its own cache (the lean loop) keeps only ``kept_positions`` after prefill and calls
``decode_evicted`` on the compacted cache, so both paths attend the same entries.

It also counts what was skipped: causal query-key pairs in prefill, cached keys in decode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from sparseland.attention import configs as C
from sparseland.attention import decode as D
from sparseland.attention import ops, search
from sparseland.attention import patterns as P
from sparseland.errors import SparselandError


class SparseAttention:
    """Runs ``config``'s method; ``stats`` holds [kept, total] for "prefill" and "decode"."""

    def __init__(self, config: C.AttentionConfig, n_layers: int) -> None:
        self.config, self.n_layers = config, n_layers
        self.layer_state: dict[int, Any] = {}
        self.selected: torch.Tensor | None = None  # TidalDecode's token set, reused across layers
        self.last_masks: dict[int, torch.Tensor] = {}  # layer -> last prefill block mask (for inspection)
        self.causal_mask_seen: torch.Tensor | None = None  # the transformers mask last checked to be causal
        self.previous_implementation: str | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}

    def sparsity(self, phase: str | None = None) -> float:
        """Fraction skipped in ``phase`` (default: the method's own phase); nan before any call."""
        kept, total = self.stats[phase or self.config.phase]
        return 1.0 - kept / total if total else float("nan")

    # ---- dispatch -------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        H, T, _ = q.shape
        S = k.shape[1]
        if T == 1:
            return self._decode(layer, q[:, 0], k, v, scale).unsqueeze(1)  # (H, 1, D)
        self.layer_state.pop(layer, None)
        if T != S:  # continuation of a cache: dense, causal with offset
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
            return F.scaled_dot_product_attention(
                q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
            )[0]
        return self._prefill(layer, q, k, v, scale)

    def _prefill(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        c, (H, T, _) = self.config, q.shape
        if c.phase == "decode":
            self.selected = None
            if isinstance(c, C.SnapKVConfig):
                w = min(c.window, T)
                kept = D.snapkv_select(q[:, T - w :], k, D.budget(c.keep, T), c.kernel, scale, c.group)  # (KVH, K)
                self.layer_state[layer] = (kept, T)
            elif isinstance(c, C.H2OConfig):
                n_keep = D.budget(c.keep, T)
                scores = D.group_scores(D.accumulated_attention(q, k, scale), k.shape[0])  # (KVH, T)
                kept = D.h2o_keep(scores, n_keep, round(c.recent * n_keep))  # (KVH, K)
                self.layer_state[layer] = (kept, scores.gather(1, kept))  # positions and scores of the entries
            pairs = H * T * (T + 1) / 2
            self._count("prefill", pairs, pairs)
            # 4-D inputs: 3-D ones miss SDPA's fused CPU kernel (~4x slower at 1k tokens on this machine)
            return F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True
            )[0]
        mask = self.block_mask(q, k, scale, layer)  # (H, nb, nb)
        nb = mask.shape[-1]
        eff = (mask | torch.eye(nb, dtype=torch.bool)) & P.causal_blocks(nb)
        counts = P.block_pair_counts(T, c.block_size)
        self._count("prefill", float((eff * counts).sum()), float(counts.sum()) * H)
        self.last_masks[layer] = eff
        return ops.block_sparse_attention(q, k, v, mask, block_size=c.block_size, scale=scale)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int = 0) -> torch.Tensor:
        """The method's block mask (H, nb, nb) for one layer's prefill q (H, T, D), k (KVH, T, D)."""
        c, (H, T, _) = self.config, q.shape
        bs = c.block_size
        nb = P.n_blocks(T, bs)
        if isinstance(c, C.StreamingConfig):
            return P.streaming_mask(H, T, bs, math.ceil(c.sink / bs), max(1, math.ceil(c.window * nb - 1e-9)))
        if isinstance(c, C.VerticalSlashConfig):
            return P.vertical_slash_mask(q, k, bs, c.last_q, c.vertical, c.slash, scale)
        if isinstance(c, C.BlockSparseConfig):
            return P.block_topk_mask(q, k, bs, c.keep, scale, c.sink_blocks)
        if isinstance(c, C.FlexPrefillConfig):
            return P.flexprefill_mask(q, k, bs, c.gamma, c.tau, c.max_density, scale)[0]
        if isinstance(c, search.HeadPatternConfig):
            return search.head_pattern_mask(self, layer, q, k, scale)
        if isinstance(c, C.XAttentionConfig):
            return P.xattention_mask(q, k, bs, c.stride, c.threshold, c.max_density, scale)
        raise TypeError(f"{type(c).__name__} has no prefill pattern")

    # ---- decode ---------------------------------------------------------------------------------
    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        c, H, S = self.config, q.shape[0], k.shape[1]
        if isinstance(c, C.QuestConfig) and layer >= c.dense_layers:
            kmin, kmax = self._quest_bounds(layer, k, c.page_size)
            n_pages = D.quest_pages(c.keep, S, c.page_size)
            if c.refine > 1:
                idx = D.quest_refine_select(q, k, kmin, kmax, S, c.page_size, n_pages, c.refine)
            else:
                idx = D.quest_select(q, kmin, kmax, S, c.page_size, n_pages)
            return self._sparse(q, k, v, idx, scale)
        if isinstance(c, C.TidalDecodeConfig) and layer >= c.dense_layers:
            reselect = c.reselect_layer if c.reselect_layer is not None else self.n_layers // 2
            if layer in (c.dense_layers, reselect) or self.selected is None:
                probs = D.full_probs(q, k, scale)  # (H, S)
                pick = D.shared_top_tokens if c.share_heads else D.top_tokens
                self.selected = pick(probs, D.budget(c.keep, S))
                self._count("decode", H * S, H * S)
                g = H // k.shape[0]
                return torch.einsum("hs,hsd->hd", probs, v.repeat_interleave(g, 0))
            return self._sparse(q, k, v, self.selected, scale)
        if isinstance(c, C.TopKDecodeConfig) and layer >= c.dense_layers:
            probs = D.full_probs(q, k, scale)  # (H, S): scored in full, attended on the top keys only
            return self._sparse(q, k, v, D.top_tokens(probs, D.budget(c.keep, S)), scale)
        if isinstance(c, C.SnapKVConfig) and layer in self.layer_state:
            kept, T = self.layer_state[layer]  # (KVH, K) prompt positions; new tokens are all attended
            idx = torch.cat([kept, torch.arange(T, S).expand(kept.shape[0], -1)], dim=-1)  # (KVH, K + S - T)
            return self._sparse(q, k, v, idx.repeat_interleave(H // idx.shape[0], 0), scale)
        if isinstance(c, C.H2OConfig) and layer in self.layer_state:  # gather the entries H2O keeps
            kept = self.layer_state[layer][0]
            idx = torch.cat([kept, torch.full((kept.shape[0], 1), S - 1)], dim=-1)[..., None]  # (KVH, K + 1, 1)
            ks, vs = k.gather(1, idx.expand(-1, -1, k.shape[2])), v.gather(1, idx.expand(-1, -1, v.shape[2]))
            return self._h2o_step(layer, q, ks, vs, scale, S)[0]
        self._count("decode", H * S, H * S)
        return ops.dense_decode_attention(q, k, v, scale=scale)

    def _sparse(self, q, k, v, idx: torch.Tensor, scale: float) -> torch.Tensor:
        self._count("decode", idx.numel(), q.shape[0] * k.shape[1])
        return ops.sparse_decode_attention(q, k, v, idx, scale=scale)

    def _quest_bounds(self, layer: int, k: torch.Tensor, page_size: int):
        """Page min/max, updated only for pages completed since the last step."""
        kmin, kmax = self.layer_state.get(layer, (k.new_empty(k.shape[0], 0, k.shape[2]),) * 2)
        done, full = kmin.shape[1], k.shape[1] // page_size
        if full > done:
            nmin, nmax = D.quest_page_bounds(k[:, done * page_size : full * page_size], page_size)
            kmin, kmax = torch.cat([kmin, nmin], 1), torch.cat([kmax, nmax], 1)
            self.layer_state[layer] = (kmin, kmax)
        return kmin, kmax

    # ---- KV-cache eviction (SnapKV, H2O) --------------------------------------------------------
    @property
    def evicts(self) -> bool:
        """Whether the method evicts KV-cache entries (SnapKV, H2O): a runtime holding its own cache
        may then keep only ``kept_positions`` after prefill and decode with ``decode_evicted``."""
        return isinstance(self.config, (C.SnapKVConfig, C.H2OConfig))

    def kept_positions(self, layer: int) -> torch.Tensor:
        """The (KVH, K) positions of ``layer``'s prompt the cache keeps, chosen at its last prefill; (H, K)
        for SnapKV ``group="query"``, whose cache holds a row per query head."""
        if not self.evicts or layer not in self.layer_state:
            raise SparselandError(f"layer {layer} has no KV-cache selection: run a prefill with SnapKV or H2O first")
        return self.layer_state[layer][0]

    def decode_evicted(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step over a compacted cache: ``k``/``v`` (KVH, n, D) are the kept entries in the
        order of ``kept_positions`` followed by the tokens decoded since (the new one last), ``length``
        the number of tokens seen. Dense attention over the entries (keys carry their rotary positions,
        and attention ignores key order). Returns the output (H, D) and, for H2O once over budget, the
        (KVH,) slot each KV head evicts; the caller moves its last entry into that slot (``swap_remove``)."""
        if layer not in self.layer_state:
            raise SparselandError(f"layer {layer} has no KV-cache selection: run a prefill with SnapKV or H2O first")
        if isinstance(self.config, C.H2OConfig):
            return self._h2o_step(layer, q, k, v, scale, length)
        self._count("decode", q.shape[0] * k.shape[1], q.shape[0] * length)
        return ops.dense_decode_attention(q, k, v, scale=scale), None

    def _h2o_step(self, layer: int, q, ks, vs, scale: float, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend the kept entries + the new token ``ks``/``vs`` (KVH, n + 1, D), add the group's
        probabilities to their scores, and evict back to budget (the lowest-scored older entry)."""
        pos, scores = self.layer_state[layer]  # (KVH, n) positions and accumulated scores of the entries
        (H, Dh), KVH = q.shape, ks.shape[0]
        n_keep = D.budget(self.config.keep, S)  # the cache may hold keep x the current length
        pos = torch.cat([pos, torch.full((KVH, 1), S - 1)], dim=-1)  # (KVH, n + 1)
        p = torch.softmax(q.view(KVH, H // KVH, Dh) @ ks.transpose(-1, -2) * scale, dim=-1)  # (KVH, G, n + 1)
        self._count("decode", H * pos.shape[1], H * S)
        scores = torch.cat([scores, torch.zeros(KVH, 1)], dim=-1) + p.sum(1)  # group-summed, (KVH, n + 1)
        drop = None
        if pos.shape[1] > n_keep:
            drop = D.h2o_evict(scores, pos, S - round(self.config.recent * n_keep))  # (KVH,)
            pos, scores = D.swap_remove(pos, drop), D.swap_remove(scores, drop)
        self.layer_state[layer] = (pos, scores)
        return (p @ vs).reshape(H, Dh), drop

    def _count(self, phase: str, kept: float, total: float) -> None:
        self.stats[phase][0] += float(kept)
        self.stats[phase][1] += float(total)
