import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.training.distributions import (
    erk_densities,
    layer_densities,
    magnitude_masks,
    n_kept,
    random_masks,
    uniform_densities,
)

LLAMA_SHAPES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64), "down": (64, 128)}


def _weighted(shapes, dens):
    return sum(dens[n] * math.prod(s) for n, s in shapes.items()) / sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_erk_hits_global_target_and_follows_the_formula(sparsity):
    d = erk_densities(LLAMA_SHAPES, sparsity)
    assert _weighted(LLAMA_SHAPES, d) == pytest.approx(1 - sparsity, rel=1e-12)
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in LLAMA_SHAPES.items()}
    # No capping here: density ratios equal the ERK score ratios.
    assert d["k"] / d["q"] == pytest.approx(raw["k"] / raw["q"])
    assert d["gate"] / d["down"] == pytest.approx(1.0)
    assert d["k"] > d["q"] > d["gate"]  # smaller layers keep more


def test_erk_caps_layers_at_one_and_rescales_the_rest():
    shapes = {"tiny": (4, 4), "small": (16, 8), "big": (512, 512)}
    d = erk_densities(shapes, 0.5)
    assert d["tiny"] == 1.0 and d["small"] == 1.0  # both would exceed 1 before capping
    assert 0 < d["big"] < 1
    assert _weighted(shapes, d) == pytest.approx(0.5, rel=1e-12)


@given(
    st.lists(st.tuples(st.integers(1, 96), st.integers(1, 96)), min_size=1, max_size=6),
    st.floats(0.0, 0.99),
)
def test_erk_property_target_and_bounds(dims, sparsity):
    shapes = {f"l{i}": s for i, s in enumerate(dims)}
    d = erk_densities(shapes, sparsity)
    assert all(0 <= v <= 1 + 1e-12 for v in d.values())
    assert _weighted(shapes, d) == pytest.approx(1 - sparsity, rel=1e-9, abs=1e-12)


def test_uniform_and_bad_distribution():
    assert all(v == pytest.approx(0.2) for v in uniform_densities(LLAMA_SHAPES, 0.8).values())
    with pytest.raises(SparselandError, match="distribution='nope'"):
        layer_densities(LLAMA_SHAPES, 0.8, "nope")
    with pytest.raises(SparselandError, match="sparsity"):
        erk_densities(LLAMA_SHAPES, 1.0)


@settings(max_examples=25)
@given(st.integers(0, 2**16), st.floats(0.0, 0.99))
def test_random_masks_exact_count_and_seeded(seed, sparsity):
    d = erk_densities(LLAMA_SHAPES, sparsity)
    a, b = random_masks(LLAMA_SHAPES, d, seed), random_masks(LLAMA_SHAPES, d, seed)
    for n, s in LLAMA_SHAPES.items():
        assert a[n].shape == s and a[n].dtype == torch.bool
        assert int(a[n].sum()) == n_kept(math.prod(s), d[n]) == round(d[n] * math.prod(s))
        assert torch.equal(a[n], b[n])


def test_random_masks_differ_across_seeds_and_magnitude_keeps_largest():
    d = uniform_densities(LLAMA_SHAPES, 0.5)
    a, b = random_masks(LLAMA_SHAPES, d, 0), random_masks(LLAMA_SHAPES, d, 1)
    assert not torch.equal(a["q"], b["q"])
    w = torch.randn(8, 16)
    m = magnitude_masks({"w": w}, {"w": 0.25})["w"]
    assert int(m.sum()) == 32
    assert w.abs()[m].min() >= w.abs()[~m].max()
