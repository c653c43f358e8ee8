"""Configs of the fine-tuning methods; each validates itself on construction and says how to fix a bad value."""

from __future__ import annotations

import dataclasses
from typing import Any

from sparseland.errors import SparselandError

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class PeftConfig:
    """Shared fields. The trainable-parameter budget is ``n_params`` if given, else ``budget`` times the
    model's parameter count (tied embeddings counted once)."""

    budget: float = 0.003
    n_params: int | None = None
    targets: tuple[str, ...] = ALL_LINEAR  # Linear layers (by name suffix) the method may train
    lr: float = 1e-3
    seed: int = 0
    # restrict to the base model's nonzero weights (a pruned model keeps its zeros); None = when the model is pruned
    keep_sparsity: bool | None = None

    method = "base"

    def __post_init__(self) -> None:
        if not 0 < self.budget < 1:
            raise SparselandError(f"budget={self.budget!r} must be a fraction in (0, 1), e.g. 0.003 for 0.3%")
        if self.n_params is not None and (not isinstance(self.n_params, int) or self.n_params <= 0):
            raise SparselandError(f"n_params={self.n_params!r} must be a positive integer")
        if not self.lr > 0:
            raise SparselandError(f"lr={self.lr!r} must be > 0 (1e-3 is a reasonable start)")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise SparselandError("targets is empty; name the Linear layers to adapt, e.g. q_proj,v_proj")
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclasses.dataclass
class SpIELConfig(PeftConfig):
    """SpIEL-AG: every ``update_every`` steps drop the ``swap_fraction`` (decaying to 0 by cosine over the
    run) of trainable indices with the smallest |delta| and regrow as many by the gradient magnitude
    accumulated over the ``accumulate`` steps before the update."""

    update_every: int = 20
    accumulate: int = 5
    swap_fraction: float = 0.2
    method = "spiel"

    def validate(self) -> None:
        if self.update_every <= 0 or not 0 < self.accumulate <= self.update_every:
            raise SparselandError(
                f"update_every={self.update_every}, accumulate={self.accumulate}: need 0 < accumulate <= update_every"
            )
        if not 0 <= self.swap_fraction <= 1:
            raise SparselandError(f"swap_fraction={self.swap_fraction} must be in [0, 1]")


@dataclasses.dataclass
class SHiRAConfig(PeftConfig):
    """SHiRA: a fixed mask, random (seeded) or the largest |W|."""

    mask: str = "random"
    method = "shira"

    def validate(self) -> None:
        if self.mask not in ("random", "magnitude"):
            raise SparselandError(f"mask={self.mask!r} must be 'random' or 'magnitude'")


@dataclasses.dataclass
class LIFTConfig(PeftConfig):
    """LIFT: train the largest entries of the rank-``rank`` approximation of each weight."""

    rank: int = 128
    method = "lift"

    def validate(self) -> None:
        if self.rank <= 0:
            raise SparselandError(f"rank={self.rank} must be positive (the paper uses 128 for 7B models)")


@dataclasses.dataclass
class S2FTConfig(PeftConfig):
    """S2FT: whole attention heads (columns of o_proj) and MLP channels (columns of down_proj);
    ``head_share`` of the budget goes to heads; selection random (paper default) or by column norm."""

    head_share: float = 0.5
    select: str = "random"
    targets: tuple[str, ...] = ("o_proj", "down_proj")
    method = "s2ft"

    def validate(self) -> None:
        if not 0 <= self.head_share <= 1:
            raise SparselandError(f"head_share={self.head_share} must be in [0, 1]")
        if self.select not in ("random", "norm"):
            raise SparselandError(f"select={self.select!r} must be 'random' or 'norm'")
        bad = set(self.targets) - {"o_proj", "down_proj"}
        if bad:
            raise SparselandError(f"S2FT trains o_proj and down_proj columns only; drop {sorted(bad)} from targets")


@dataclasses.dataclass
class LoRAConfig(PeftConfig):
    """LoRA through Hugging Face peft; rank = the largest that fits the budget on ``targets`` (or ``rank``)."""

    rank: int | None = None
    alpha_over_rank: float = 2.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    mask_merge: bool | None = None  # mask the merged update to the base's nonzeros (None: when pruned)
    method = "lora"

    def validate(self) -> None:
        if self.rank is not None and self.rank <= 0:
            raise SparselandError(f"rank={self.rank} must be positive")


@dataclasses.dataclass
class SparseLoRAConfig(PeftConfig):
    """Sparse + low-rank (SLTrain / DSEE style): a peft LoRA on ``lora_targets`` with ``lora_share`` of the
    budget, plus a fixed sparse delta (random support as in SLTrain, or largest |W|) on ``targets``."""

    lora_share: float = 0.5
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    alpha_over_rank: float = 2.0
    support: str = "random"
    method = "sparse-lora"

    def validate(self) -> None:
        if not 0 < self.lora_share < 1:
            raise SparselandError(f"lora_share={self.lora_share} must be in (0, 1)")
        if self.support not in ("random", "magnitude"):
            raise SparselandError(f"support={self.support!r} must be 'random' or 'magnitude'")
        self.lora_targets = tuple(self.lora_targets)


METHODS: dict[str, type[PeftConfig]] = {
    c.method: c for c in (SpIELConfig, SHiRAConfig, LIFTConfig, S2FTConfig, LoRAConfig, SparseLoRAConfig)
}


def make_config(method: str, **kwargs: Any) -> PeftConfig:
    if method not in METHODS:
        raise SparselandError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](**{k: v for k, v in kwargs.items() if v is not None})
