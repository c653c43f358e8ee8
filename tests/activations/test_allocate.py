"""Greedy allocation: hits the model-wide target and gives sparsity to the cheap groups first."""

from __future__ import annotations

import pytest
import torch

from sparseland import sparsify_
from sparseland.activations import TEALConfig, get_state
from sparseland.activations.allocate import GRID, GROUPS, allocate, group_params
from sparseland.errors import SparselandError

PARAMS = {"qkv": 100, "o": 50, "gate_up": 300, "down": 150}


def weighted(levels: dict[str, float], params: dict[str, int]) -> float:
    per_group = {g: levels[roles[0]] for g, roles in GROUPS.items()}
    return sum(per_group[g] * params[g] for g in params) / sum(params.values())


@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.8])
def test_allocation_hits_the_parameter_weighted_target(target: float) -> None:
    curves = {g: [k * s**2 for s in GRID] for k, g in zip((4.0, 1.0, 2.0, 3.0), GROUPS, strict=True)}
    levels = allocate(curves, PARAMS, target)
    assert weighted(levels, PARAMS) == pytest.approx(target, abs=1e-4)
    if target > 0:  # the cheapest group per weight (gate_up: k / P = 2 / 300) is the sparsest
        assert levels["gate"] == max(levels.values())


def test_free_group_is_used_first() -> None:
    curves = {g: [0.0] * len(GRID) if g == "gate_up" else [s for s in GRID] for g in GROUPS}
    levels = allocate(curves, PARAMS, 0.3)
    assert levels["gate"] == levels["up"] == pytest.approx(0.3 * 600 / 300) and levels["q"] == 0


def test_greedy_teal_on_a_tiny_model(tiny_llama) -> None:
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))  # (N, T)
    sparsify_(tiny_llama, TEALConfig(0.5, greedy=True), calibration=calib)
    levels = get_state(tiny_llama).config["allocation"]
    assert weighted(levels, group_params(tiny_llama)) == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(SparselandError):
        TEALConfig(0.5, allocation={"mlp": 0.5})
    with pytest.raises(SparselandError):
        TEALConfig(0.5, allocation={"q": 1.5})
