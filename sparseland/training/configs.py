"""One validated config per sparse-training method (JSON round trip through ``SparsityConfig``).

Steps count completed optimizer steps: the sparsifier's ``step()`` is called once after each
``optimizer.step()``, and ``total_steps`` is the length of the run.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparseland.config import SparsityConfig, check_fraction
from sparseland.errors import SparselandError
from sparseland.training.distributions import check_distribution
from sparseland.weights.config import parse_pattern

STATIC_INITS = ("random", "magnitude")
PGF_DECAYS = ("linear", "exp", "structure")


def _check_int(name: str, value: object, minimum: int, hint: str = "") -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise SparselandError(f"{name}={value!r} must be an integer >= {minimum}{hint}")


def _check_seed(seed: object) -> None:
    _check_int("seed", seed, 0)


def _check_nm(pattern: str) -> tuple[int, int]:
    nm = parse_pattern(pattern)
    if nm is None:
        raise SparselandError(
            f"pattern={pattern!r} must be N:M here (e.g. '2:4', '1:8'); these methods train N:M masks"
        )
    return nm


@dataclasses.dataclass
class StaticConfig(SparsityConfig):
    """A fixed mask for the whole run: random (Liu et al. 2022) or one-shot magnitude, uniform or ERK."""

    kind: ClassVar[str] = "static"
    sparsity: float = 0.9
    distribution: str = "erk"
    init: str = "random"
    seed: int = 0

    def validate(self) -> None:
        check_fraction("sparsity", self.sparsity)
        check_distribution(self.distribution)
        if self.init not in STATIC_INITS:
            raise SparselandError(f"init={self.init!r} is not one of {STATIC_INITS}")
        _check_seed(self.seed)


@dataclasses.dataclass
class GMPConfig(SparsityConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017): prune at t0, t0 + dt, ..., t0 + n dt on the cubic schedule."""

    kind: ClassVar[str] = "gmp"
    sparsity: float = 0.9  # s_f
    initial_sparsity: float = 0.0  # s_i
    start_step: int = 0  # t0
    prune_every: int = 100  # dt
    n_prunes: int = 10  # n
    distribution: str = "uniform"

    def validate(self) -> None:
        check_fraction("sparsity", self.sparsity)
        check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.sparsity:
            raise SparselandError(
                f"initial_sparsity={self.initial_sparsity} exceeds sparsity={self.sparsity}; GMP only prunes more"
            )
        _check_int("start_step", self.start_step, 0)
        _check_int("prune_every", self.prune_every, 1)
        _check_int("n_prunes", self.n_prunes, 1)
        check_distribution(self.distribution)

    @property
    def end_step(self) -> int:
        return self.start_step + self.n_prunes * self.prune_every


@dataclasses.dataclass
class GraNetConfig(GMPConfig):
    """GraNet (Liu et al. 2021): GMP's cubic schedule plus, every ``prune_every`` steps until
    ``end_fraction * total_steps``, RigL-style neuroregeneration (drop a cosine-decayed fraction, regrow
    as many by |gradient|)."""

    kind: ClassVar[str] = "granet"
    drop_fraction: float = 0.3
    total_steps: int = 1000
    end_fraction: float = 0.75

    def validate(self) -> None:
        super().validate()
        check_fraction("drop_fraction", self.drop_fraction, allow_one=True)
        _check_int("total_steps", self.total_steps, 1)
        check_fraction("end_fraction", self.end_fraction, allow_one=True)


@dataclasses.dataclass
class DSTConfig(SparsityConfig):
    """Fields shared by the dynamic sparse training methods (not registered itself: use SET or RigL)."""

    sparsity: float = 0.9
    distribution: str = "erk"
    update_every: int = 100  # Delta T
    drop_fraction: float = 0.3  # alpha, cosine-decayed to 0 at end_fraction * total_steps
    total_steps: int = 1000
    end_fraction: float = 0.75  # no mask updates after end_fraction * total_steps (RigL's T_end)
    seed: int = 0

    def validate(self) -> None:
        check_fraction("sparsity", self.sparsity)
        check_distribution(self.distribution)
        _check_int("update_every", self.update_every, 1)
        check_fraction("drop_fraction", self.drop_fraction, allow_one=True)
        _check_int("total_steps", self.total_steps, 1, "; pass the length of the training run")
        check_fraction("end_fraction", self.end_fraction, allow_one=True)
        _check_seed(self.seed)


@dataclasses.dataclass
class SETConfig(DSTConfig):
    """SET (Mocanu et al. 2018): drop the smallest |W|, regrow as many at random."""

    kind: ClassVar[str] = "set"


@dataclasses.dataclass
class RigLConfig(DSTConfig):
    """RigL (Evci et al. 2020): drop the smallest |W|, regrow as many where the dense |gradient| is largest."""

    kind: ClassVar[str] = "rigl"


@dataclasses.dataclass
class SRSTEConfig(SparsityConfig):
    """SR-STE (Zhou et al. 2021): N:M of the dense weights each step; STE gradient + lambda_W (1 - m) W."""

    kind: ClassVar[str] = "srste"
    pattern: str = "2:4"
    decay: float = 2e-4  # lambda_W, the sparse-refined term
    total_steps: int | None = None  # if set, the pruned weights are zeroed for good after this many steps

    def validate(self) -> None:
        _check_nm(self.pattern)
        if not (isinstance(self.decay, (int, float)) and self.decay >= 0):
            raise SparselandError(f"decay={self.decay!r} must be >= 0 (the paper uses 2e-4)")
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, 1)

    @property
    def nm(self) -> tuple[int, int]:
        return _check_nm(self.pattern)


@dataclasses.dataclass
class ProgressiveGradientFlowConfig(SparsityConfig):
    """Progressive gradient flow (Bambhaniya et al. 2024): pruned weights scaled by a factor decaying 1 -> 0.

    ``decay`` is "linear" or "exp" (MDGF: the soft mask value of pruned weights decays, and so does their
    gradient) or "structure" (SDGF: binary masks stepping (M-1):M -> M/2:M -> ... -> N:M). Phases:
    dense for ``dense_fraction`` of ``total_steps``, decay until ``1 - fine_tune_fraction``, then hard N:M.
    """

    kind: ClassVar[str] = "progressive_gradient_flow"
    pattern: str = "1:8"
    total_steps: int = 1000
    decay: str = "exp"
    decay_coef: float | None = None  # per step; default: linear reaches 0, exp reaches 1e-3 at the decay end
    dense_fraction: float = 0.0
    fine_tune_fraction: float = 0.2

    def validate(self) -> None:
        _check_nm(self.pattern)
        _check_int("total_steps", self.total_steps, 1, "; pass the length of the training run")
        if self.decay not in PGF_DECAYS:
            raise SparselandError(f"decay={self.decay!r} is not one of {PGF_DECAYS}; the paper's best is 'exp'")
        if self.decay_coef is not None and not self.decay_coef > 0:
            raise SparselandError(f"decay_coef={self.decay_coef!r} must be positive, or None for the default")
        check_fraction("dense_fraction", self.dense_fraction)
        check_fraction("fine_tune_fraction", self.fine_tune_fraction)
        if self.dense_fraction + self.fine_tune_fraction >= 1:
            raise SparselandError(
                f"dense_fraction + fine_tune_fraction = {self.dense_fraction + self.fine_tune_fraction} leaves no "
                "decay phase; make their sum < 1"
            )

    @property
    def nm(self) -> tuple[int, int]:
        return _check_nm(self.pattern)
