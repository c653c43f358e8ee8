"""``SparseAttention``: the per-model object that runs one method's attention for every layer.

Both integrations call ``attend(layer, q, k, v, scale)`` with batch size 1, ``q`` (H, T, D) for the
last ``T`` positions and ``k``/``v`` (KVH, S, D) for all ``S`` cached positions:

* prefill (T == S > 1): a prefill pattern builds a block mask -> ``block_sparse_attention``;
  decode methods attend densely and SnapKV / H2O choose the tokens they keep;
* decode (T == 1): a decode method picks positions -> ``sparse_decode_attention``;
* anything else (a multi-token continuation of a cache) runs dense causal attention.

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
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return self._prefill(layer, q, k, v, scale)

    def _prefill(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        c, (H, T, _) = self.config, q.shape
        if c.phase == "decode":
            self.selected = None
            if isinstance(c, C.SnapKVConfig):
                w = min(c.window, T)
                kept = D.snapkv_select(q[:, T - w :], k, D.budget(c.keep, T), c.kernel, scale)
                self.layer_state[layer] = (kept, T)
            elif isinstance(c, C.H2OConfig):
                n_keep = D.budget(c.keep, T)
                scores = D.accumulated_attention(q, k, scale)  # (H, T)
                self.layer_state[layer] = (D.h2o_keep(scores, n_keep, round(c.recent * n_keep)), scores)
            pairs = H * T * (T + 1) / 2
            self._count("prefill", pairs, pairs)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
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
            n_pages = math.ceil(c.keep * S / c.page_size - 1e-9)
            return self._sparse(q, k, v, D.quest_select(q, kmin, kmax, S, c.page_size, n_pages), scale)
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
            kept, T = self.layer_state[layer]  # (H, K) prompt positions; new tokens are all attended
            new = torch.arange(T, S).expand(H, -1)
            return self._sparse(q, k, v, torch.cat([kept, new], dim=-1), scale)
        if isinstance(c, C.H2OConfig) and layer in self.layer_state:
            return self._h2o_step(layer, q, k, v, scale)
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

    def _h2o_step(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """Attend kept + the new token, add the probabilities to the scores, evict back to budget."""
        kept, scores = self.layer_state[layer]
        H, S = q.shape[0], k.shape[1]
        n_keep = D.budget(self.config.keep, S)  # the cache may hold keep x the current length
        n_recent = round(self.config.recent * n_keep)
        if scores.shape[1] < S:
            scores = F.pad(scores, (0, S - scores.shape[1]))
        cand = torch.cat([kept, torch.full((H, 1), S - 1)], dim=-1)  # (H, K + 1)
        kv_head = torch.arange(H) // (H // k.shape[0])
        ks, vs = k[kv_head[:, None], cand], v[kv_head[:, None], cand]  # (H, K + 1, D)
        p = torch.softmax(torch.einsum("hd,hkd->hk", q, ks) * scale, dim=-1)
        self._count("decode", cand.numel(), H * S)
        scores.scatter_add_(1, cand, p)
        if cand.shape[1] > n_keep:
            key = scores.gather(1, cand).masked_fill(cand >= S - n_recent, float("inf"))
            drop = key.argmin(-1, keepdim=True)  # (H, 1)
            keep_mask = torch.ones_like(cand, dtype=torch.bool).scatter_(1, drop, False)
            cand = cand[keep_mask].view(H, -1)
        self.layer_state[layer] = (cand, scores)
        return torch.einsum("hk,hkd->hd", p, vs)

    def _count(self, phase: str, kept: float, total: float) -> None:
        self.stats[phase][0] += float(kept)
        self.stats[phase][1] += float(total)
