import pytest

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.training import (
    GMPConfig,
    ProgressiveGradientFlowConfig,
    RigLConfig,
    SETConfig,
    SRSTEConfig,
    StaticConfig,
)

GOOD = [
    StaticConfig(sparsity=0.8, distribution="uniform", init="magnitude", seed=2),
    GMPConfig(sparsity=0.9, initial_sparsity=0.1, start_step=5, prune_every=10, n_prunes=3),
    SETConfig(sparsity=0.8, total_steps=100),
    RigLConfig(sparsity=0.9, update_every=10, drop_fraction=0.3, total_steps=100),
    SRSTEConfig(pattern="1:8", decay=1e-4, total_steps=50),
    ProgressiveGradientFlowConfig(pattern="2:4", total_steps=50, decay="linear", dense_fraction=0.1),
]


@pytest.mark.parametrize("cfg", GOOD, ids=lambda c: c.kind)
def test_json_round_trip(cfg):
    assert SparsityConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: StaticConfig(sparsity=1.0), "sparsity=1.0"),
        (lambda: StaticConfig(init="lottery"), "init='lottery'"),
        (lambda: StaticConfig(distribution="er"), "distribution='er'"),
        (lambda: GMPConfig(initial_sparsity=0.95, sparsity=0.9), "initial_sparsity=0.95 exceeds"),
        (lambda: GMPConfig(prune_every=0), "prune_every=0"),
        (lambda: RigLConfig(total_steps=0), "total_steps=0"),
        (lambda: RigLConfig(drop_fraction=1.5), "drop_fraction=1.5"),
        (lambda: SETConfig(update_every=2.5), "update_every=2.5"),
        (lambda: SRSTEConfig(pattern="unstructured"), "must be N:M"),
        (lambda: SRSTEConfig(pattern="4:2"), "0 < N < M"),
        (lambda: SRSTEConfig(decay=-1.0), "decay=-1.0"),
        (lambda: ProgressiveGradientFlowConfig(decay="cosine"), "decay='cosine'"),
        (lambda: ProgressiveGradientFlowConfig(dense_fraction=0.5, fine_tune_fraction=0.5), "no decay phase"),
        (lambda: ProgressiveGradientFlowConfig(decay_coef=0.0), "decay_coef=0.0"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(make, match):
    with pytest.raises(SparselandError, match=match):
        make()
