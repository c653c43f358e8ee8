"""Offline per-head pattern search (MoA, Fu et al. 2024; MInference's offline pattern choice).

Each head of each layer gets one of several candidate prefill patterns: the one with the least output
error against dense attention on calibration windows, under an average density budget
(min sum error + lambda * density per head, lambda bisected until the mean density fits).

    cfg = search_head_patterns(model, calib, [StreamingConfig(window=w) for w in (0.05, 0.1, 0.2)], budget=0.15)
    save_head_patterns(cfg, model_dir); sparsify_(model, load_head_patterns(model_dir))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm import tqdm

from sparseland.attention import patterns as P
from sparseland.attention.configs import PrefillConfig
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic

FILENAME = "sparse_attention.json"


@dataclass
class HeadPatternConfig(PrefillConfig):
    """Per-head prefill patterns: ``choice[layer][head]`` indexes ``candidates`` (prefill config dicts)."""

    kind: ClassVar[str] = "head_patterns"
    candidates: list = field(default_factory=list)
    choice: list = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if not self.candidates:
            raise SparselandError("candidates is empty; give prefill configs such as StreamingConfig(window=0.1)")
        self.candidates = [c.to_dict() if isinstance(c, SparsityConfig) else dict(c) for c in self.candidates]
        for c in self.candidates:
            cfg = SparsityConfig.from_dict(c)
            if not isinstance(cfg, PrefillConfig) or isinstance(cfg, HeadPatternConfig):
                raise SparselandError(f"candidate {c} is not a prefill pattern config")
            if cfg.block_size != self.block_size:
                raise SparselandError(f"candidate block_size {cfg.block_size} != block_size={self.block_size}")
        bad = [i for row in self.choice for i in row if not (isinstance(i, int) and 0 <= i < len(self.candidates))]
        if bad:
            raise SparselandError(
                f"choice holds {bad[:3]}: each entry must index candidates (0..{len(self.candidates) - 1})"
            )

    def configs(self) -> list[PrefillConfig]:
        return [SparsityConfig.from_dict(c) for c in self.candidates]  # type: ignore[misc]


def head_pattern_mask(state, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Assemble one layer's per-head block mask (H, nb, nb) from the candidates its heads chose."""
    from sparseland.attention.methods import SparseAttention

    cfg: HeadPatternConfig = state.config
    if layer >= len(cfg.choice) or len(cfg.choice[layer]) != q.shape[0]:
        raise SparselandError(f"head_patterns has no choice for layer {layer} with {q.shape[0]} heads; search again")
    row = torch.tensor(cfg.choice[layer])  # (H,)
    out = None
    for c_idx, c in enumerate(cfg.configs()):
        if (row == c_idx).any():
            m = SparseAttention(c, state.n_layers).block_mask(q, k, scale)
            out = m.clone() if out is None else out
            out[row == c_idx] = m[row == c_idx]
    return out


class _Capture:
    """Stands in for a method in the lean loop: records each layer's q/k/v and attends densely."""

    def __init__(self) -> None:
        self.qkv: dict[int, tuple[torch.Tensor, ...]] = {}

    def attend(self, layer, q, k, v, scale):
        self.qkv[layer] = (q.clone(), k.clone(), v.clone(), scale)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


@torch.inference_mode()
def search_head_patterns(
    model: torch.nn.Module, calibration: torch.Tensor, candidates: list[PrefillConfig], budget: float
) -> HeadPatternConfig:
    """Per head, the candidate with least calibration output error, mean density <= ``budget``."""
    from sparseland.attention import ops
    from sparseland.attention.hf import _attention_modules
    from sparseland.attention.methods import SparseAttention
    from sparseland.runtime.generate import LeanDecoder

    if calibration is None or calibration.dim() != 2:
        raise SparselandError(
            "calibration must be a (N, T) LongTensor of token windows, e.g. corpus.calibration(2, 2048)"
        )
    base = HeadPatternConfig(block_size=candidates[0].block_size, candidates=candidates, choice=[])
    modules = _attention_modules(model)
    L, C = len(modules), len(candidates)
    err, dens = None, None
    for window in tqdm(calibration, desc="pattern search", leave=False):
        cap = _Capture()
        for m in modules:
            m._sparseland_attention = cap
        try:
            LeanDecoder(model, window.numel()).step(window.view(1, -1))
        finally:
            for m in modules:
                del m._sparseland_attention
        for layer, (q, k, v, scale) in cap.qkv.items():
            H, T, _ = q.shape
            dense = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
            counts = P.block_pair_counts(T, base.block_size)
            if err is None:
                err, dens = torch.zeros(L, H, C), torch.zeros(L, H, C)
            for c_idx, c in enumerate(base.configs()):
                mask = SparseAttention(c, L).block_mask(q, k, scale)
                nb = mask.shape[-1]
                eff = (mask | torch.eye(nb, dtype=torch.bool)) & P.causal_blocks(nb)
                o = ops.block_sparse_attention(q, k, v, mask, block_size=base.block_size, scale=scale)
                err[layer, :, c_idx] += (o - dense).pow(2).sum((1, 2))
                dens[layer, :, c_idx] += (eff * counts).sum((1, 2)) / counts.sum() / len(calibration)
    lo, hi = 0.0, float(err.max()) / max(float(dens.min()), 1e-9) * 10 + 1.0
    for _ in range(60):  # bisect lambda: larger lambda -> sparser choices
        lam = (lo + hi) / 2
        pick = (err + lam * dens).argmin(-1)
        if dens.gather(-1, pick.unsqueeze(-1)).mean() > budget:
            lo = lam
        else:
            hi = lam
    pick = (err + hi * dens).argmin(-1)  # (L, H)
    return HeadPatternConfig(block_size=base.block_size, candidates=base.candidates, choice=pick.tolist())


def save_head_patterns(config: HeadPatternConfig, model_dir: str | Path) -> Path:
    """Write the searched patterns next to the model as ``sparse_attention.json`` (atomically)."""
    return write_text_atomic(Path(model_dir) / FILENAME, config.to_json())


def load_head_patterns(path: str | Path) -> HeadPatternConfig:
    """Read ``sparse_attention.json`` from a model directory (or the file itself)."""
    p = Path(path)
    p = p / FILENAME if p.is_dir() else p
    if not p.exists():
        raise SparselandError(f"no searched attention patterns at {p}; run search_head_patterns and save them first")
    cfg = SparsityConfig.from_json(p.read_text())
    if not isinstance(cfg, HeadPatternConfig):
        raise SparselandError(f"{p} holds a {type(cfg).__name__}, not head patterns")
    return cfg
