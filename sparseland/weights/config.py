"""Configs of the weight-pruning methods and the sparsity pattern parser.

Every config takes a target ``sparsity`` (fraction of zeros) and a ``pattern``: ``"unstructured"``
(each output row keeps ``(1 - sparsity)`` of its weights) or ``"N:M"`` (every ``M`` consecutive input
weights of a row keep ``N``: ``"2:4"`` is 50% sparse, and the sparsity is then ``1 - N/M``).
``allocation="owl"`` spreads the target over the decoder blocks by their outlier ratio (OWL).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from sparseland.config import SparsityConfig, check_fraction
from sparseland.errors import SparselandError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
ALLOCATIONS = ("uniform", "owl")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"N:M"`` -> ``(N, M)`` (keep N of every M), validated."""
    if not isinstance(pattern, str):
        raise SparselandError(f"pattern={pattern!r} must be a string: 'unstructured' or 'N:M' such as '2:4'")
    if pattern.strip().lower() == "unstructured":
        return None
    match = _NM.match(pattern)
    if match is None:
        raise SparselandError(
            f"pattern={pattern!r} is not understood; pass 'unstructured' or 'N:M' (keep N of every M "
            "consecutive weights), e.g. '2:4' or '4:8'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SparselandError(
            f"pattern={pattern!r} needs 0 < N < M (N weights kept of every M); e.g. '2:4' keeps 2 of 4 (50% sparse)"
        )
    return n, m


@dataclasses.dataclass
class PruningConfig(SparsityConfig):
    """Common fields of the weight-pruning configs (not registered itself: use a subclass)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    seed: int = 0
    owl_m: float = 5.0  # OWL: a score is an outlier when it is > owl_m * the layer mean
    owl_lambda: float = 0.08  # OWL: per-layer sparsities stay within target +- owl_lambda
    quant: str | None = None  # quantize the kept weights too (e.g. "int4-g64"): jointly for SparseGPT
    needs_calibration: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def validate(self) -> None:
        check_fraction("sparsity", self.sparsity)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity not in (0.5, implied):  # 0.5 is the default; anything else must agree
                raise SparselandError(
                    f"sparsity={self.sparsity} disagrees with pattern={self.pattern!r}, which is "
                    f"{implied:.4g} sparse; leave sparsity at its default or pass sparsity={implied:.4g}"
                )
            self.sparsity = implied
        if self.allocation not in ALLOCATIONS:
            raise SparselandError(f"allocation={self.allocation!r} is not one of {ALLOCATIONS}")
        if self.allocation == "owl" and nm is not None:
            raise SparselandError(
                "allocation='owl' gives each layer its own unstructured sparsity and cannot keep an N:M "
                "pattern; use pattern='unstructured' with OWL, or allocation='uniform' with N:M"
            )
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise SparselandError(f"seed={self.seed!r} must be a non-negative integer")
        if not self.owl_m > 0:
            raise SparselandError(f"owl_m={self.owl_m!r} must be positive (the paper uses 5)")
        check_fraction("owl_lambda", self.owl_lambda)
        if self.quant is not None:
            from sparseland.quant.scheme import QuantScheme

            self.quant = QuantScheme.parse(self.quant).name

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def uses_calibration(self) -> bool:
        return self.needs_calibration or self.allocation == "owl"


@dataclasses.dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning (Han et al., "Learning both Weights and Connections", 2015): drop the smallest |W|
    in each comparison group (an output row, or an M-group)."""

    kind: ClassVar[str] = "magnitude"


@dataclasses.dataclass
class RandomConfig(PruningConfig):
    """Random pruning ("The Unreasonable Effectiveness of Random Pruning", Liu et al., ICLR 2022): drop a
    seeded uniformly random subset of each comparison group; the baseline every method must beat."""

    kind: ClassVar[str] = "random"


@dataclasses.dataclass
class WandaConfig(PruningConfig):
    """Wanda ("A Simple and Effective Pruning Approach for LLMs", Sun et al., 2023): score
    |W_ij| * ||X_j||_2 over the calibration tokens, drop the lowest scores of each output row."""

    kind: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True


@dataclasses.dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT (Frantar & Alistarh, 2023): OBS column by column with H = X^T X, masks chosen
    adaptively per block of ``blocksize`` columns, the error of each pruned weight compensated in the
    columns after it."""

    kind: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise SparselandError(f"blocksize={self.blocksize!r} must be a positive integer (128 in the paper)")
        nm = self.nm
        if nm is not None and self.blocksize % nm[1]:
            raise SparselandError(f"blocksize={self.blocksize} must be a multiple of M={nm[1]}")
        if not self.percdamp > 0:
            raise SparselandError(f"percdamp={self.percdamp!r} must be positive (0.01 in the paper)")


INIT_METHODS = ("magnitude", "random", "wanda", "sparsegpt")


@dataclasses.dataclass
class DSnoTConfig(PruningConfig):
    """DSnoT ("Dynamic Sparse No Training", Zhang et al., ICLR 2024): start from the ``init`` method's
    mask, then swap pruned and kept weights of a row (grow one, prune one) guided by the expected
    reconstruction error sum_j dW_ij E[x_j], penalised by Var[x_j]; a swap is kept only if it lowers
    the layer's reconstruction error on the calibration inputs."""

    kind: ClassVar[str] = "dsnot"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    init: str = "wanda"
    max_cycles: int = 50
    update_threshold: float = 0.0  # absolute, on the per-token expected error (the paper's 0.1 fit its scaling)
    pow_of_var: float = 1.0
    blocksize: int = 128  # used when init == "sparsegpt"
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.init not in INIT_METHODS:
            raise SparselandError(f"init={self.init!r} is not one of {INIT_METHODS}")
        if not (isinstance(self.max_cycles, int) and self.max_cycles > 0):
            raise SparselandError(f"max_cycles={self.max_cycles!r} must be a positive integer (50 in the paper)")
        if not self.update_threshold >= 0:
            raise SparselandError(f"update_threshold={self.update_threshold!r} must be >= 0")
        if not self.pow_of_var >= 0:
            raise SparselandError(f"pow_of_var={self.pow_of_var!r} must be >= 0")

    def init_config(self) -> PruningConfig:
        cls = {"magnitude": MagnitudeConfig, "random": RandomConfig, "wanda": WandaConfig}.get(self.init)
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(PruningConfig)}
        if cls is not None:
            return cls(**common)
        return SparseGPTConfig(**common, blocksize=self.blocksize, percdamp=self.percdamp)
