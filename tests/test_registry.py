"""One name -> config registry shared by Python (``make_config`` + ``sparsify_``), the CLI and the frontier."""

from __future__ import annotations

import pytest
import torch

import sparseland
from sparseland import registry
from sparseland.api import _REGISTRY, sparsify_
from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from tests.conftest import make_tiny_llama


def _applier(config: SparsityConfig):
    return next((_REGISTRY[c] for c in type(config).__mro__ if c in _REGISTRY), None)


@pytest.mark.parametrize("name", registry.names())
def test_every_name_builds_a_config_sparsify_applies(name):
    entry = registry.get_entry(name)
    config = registry.make_config(name, None if not entry.takes_sparsity else 0.5)
    assert isinstance(config, SparsityConfig)
    assert _applier(config) is not None, f"sparsify_ has no method for {type(config).__name__}"


@pytest.mark.parametrize("name", registry.names("weights") + registry.names("activations") + ("streaming", "int4"))
def test_registered_names_apply_to_a_tiny_model(name):
    model = make_tiny_llama()
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    entry = registry.get_entry(name)
    options = {"rank": 2} if name == "rsparse" else {}  # rank 16 costs more than it saves on a 64-wide Linear
    config = registry.make_config(name, 0.5 if entry.takes_sparsity else None, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsify_(model, config, calibration=calib)
    with torch.no_grad():
        out = model(calib[:1]).logits  # sparse attention runs one sequence at a time
    assert torch.isfinite(out).all()
    if entry.family in ("weights", "quant"):
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "weights unchanged"


def test_frontier_and_cli_use_the_registry_names():
    from sparseland.activations.cli import METHODS as ACTIVATION_CLI
    from sparseland.bench.frontier import get_runner
    from sparseland.weights.cli import METHODS as WEIGHTS_CLI

    for name in registry.names("weights") + registry.names("activations") + registry.names("quant"):
        assert get_runner(name).family == registry.get_entry(name).family
    for name in ("streaming", "vertical_slash", "flexprefill"):
        assert get_runner(name).family == "attention"
    assert set(ACTIVATION_CLI) == set(registry.names("activations"))
    assert set(WEIGHTS_CLI) <= set(registry.names("weights"))


def test_options_reach_the_config_and_bad_ones_are_clear():
    c = registry.make_config("wanda", 0.5, pattern="2:4")
    assert (type(c).__name__, c.sparsity, c.pattern) == ("WandaConfig", 0.5, "2:4")
    assert registry.make_config("owl", 0.6).allocation == "owl"
    assert registry.make_config("int4-sym").scheme == "int4-g32-sym"
    assert registry.make_config("quest", 0.75).keep == pytest.approx(0.25)
    with pytest.raises(SparselandError, match="unknown option"):
        registry.make_config("wanda", 0.5, not_a_field=1)
    with pytest.raises(SparselandError, match="unknown method 'nope'"):
        registry.make_config("nope")
    with pytest.raises(SparselandError, match="takes no sparsity"):
        registry.make_config("int8", 0.5)


def test_every_exported_config_is_applied_by_sparsify_():
    exported = [getattr(sparseland, n) for n in sparseland.__all__]
    configs = [c for c in exported if isinstance(c, type) and issubclass(c, SparsityConfig) and c is not SparsityConfig]
    assert len(configs) >= 20
    missing = [cls.__name__ for cls in configs if not any(c in _REGISTRY for c in cls.__mro__)]
    assert not missing, f"exported configs sparsify_ cannot apply: {missing}"


def test_training_configs_return_their_controller():
    from sparseland.training import GMPConfig
    from sparseland.training.sparsifiers import Sparsifier

    model = make_tiny_llama()
    sp = sparsify_(model, GMPConfig(sparsity=0.5, start_step=0, prune_every=1, n_prunes=4))
    assert isinstance(sp, Sparsifier)
    for _ in range(5):
        sp.step()
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.4 <= float((w == 0).float().mean()) <= 0.6
