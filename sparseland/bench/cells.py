"""The frontier's vocabulary: a ``Cell`` (one grid point, declarative), the ``FrontierSettings`` every
cell shares, and the ``Workload`` (the loaded dense model and its data) the runners work on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseland.errors import SparselandError

LONGCTX_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")  # the tasks dense solves at 1k-2k
Calibration = Callable[[], torch.Tensor]  # () -> (n, T) LongTensor, computed on first use


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"N:M"`` -> ``(N, M)``; ``"unstructured"`` -> ``None``; anything else is a clear error."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise SparselandError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' with 0 < N < M (e.g. 2:4)")


@dataclass
class Cell:
    """One grid point. ``pattern``: "dense", "unstructured" or "N:M"; ``options`` go to the method config."""

    method: str
    sparsity: float
    pattern: str = "unstructured"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": round(float(self.sparsity), 6),
            "pattern": self.pattern,
            "options": dict(sorted(self.options.items())),
        }

    @property
    def label(self) -> str:
        if self.pattern == "dense":
            return self.method
        opts = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method} {self.sparsity:.0%} {self.pattern}{opts}"


@dataclass(frozen=True)
class FrontierSettings:
    """What every cell shares: the model, the text and how much of it is used.

    ``longctx_length`` > 0 adds long-context accuracy (the RULER-style suite of ``sparseland longctx``,
    ``longctx_samples`` per task) to the cells where it is relevant: dense and every cell with sparse
    attention. It is part of the key of those cells only.
    """

    model: str = "smollm2-135m"
    text: str | None = None  # None: the embedded text
    seq_len: int = 512
    eval_windows: int = 16
    calib_windows: int = 16
    seed: int = 0
    batch_size: int = 4  # not part of the cell key: it does not change the numbers
    longctx_length: int = 0  # 0: no long-context accuracy
    longctx_samples: int = 1
    longctx_tasks: tuple[str, ...] = LONGCTX_TASKS

    def key_dict(self, longctx: bool = True) -> dict[str, Any]:
        """The settings that decide a cell's numbers (the long-context ones only if ``longctx`` and on)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        if not (longctx and self.longctx_length):
            for k in ("longctx_length", "longctx_samples", "longctx_tasks"):
                d.pop(k)
        else:
            d["longctx_tasks"] = list(self.longctx_tasks)
        return d


@dataclass
class Workload:
    """The loaded dense model plus its data: evaluation windows, a lazy calibration set and (for
    long-context accuracy) the tokenizer."""

    model: torch.nn.Module
    eval_windows: torch.Tensor  # (N, T)
    calibration: Calibration
    seed: int = 0  # for seeded methods (random pruning)
    tokenizer: Any = None
    _longctx: list = field(default_factory=list, repr=False)

    def longctx_samples(self, settings: FrontierSettings) -> list:
        """The long-context samples of ``settings`` (generated once, seeded)."""
        if not self._longctx:
            if self.tokenizer is None:
                raise SparselandError("long-context accuracy needs the tokenizer in the workload; pass tokenizer=")
            from sparseland.data.longctx import generate_samples
            from sparseland.models.loader import model_context_length

            self._longctx.extend(
                generate_samples(
                    self.tokenizer,
                    [settings.longctx_length],
                    settings.longctx_tasks,
                    settings.longctx_samples,
                    seed=settings.seed,
                    max_context=model_context_length(self.model),
                )
            )
        return self._longctx
