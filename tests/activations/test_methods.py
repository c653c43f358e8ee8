"""Methods on a tiny random Llama: target sparsity is met, sparsity 0 changes nothing, configs validate."""

from __future__ import annotations

import pytest
import torch

from sparseland import SparsityConfig, sparsify_
from sparseland.activations import (
    CATSConfig,
    CHESSConfig,
    RSparseConfig,
    Site,
    TEALConfig,
    WINAConfig,
    activation_thresholds,
    get_state,
    measure_sparsity,
    remove,
)
from sparseland.activations.sites import install
from sparseland.errors import SparselandError
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))  # (N, T)
CONFIGS = [
    lambda s: TEALConfig(sparsity=s),
    lambda s: CATSConfig(sparsity=s),
    lambda s: CHESSConfig(sparsity=s),
    lambda s: WINAConfig(sparsity=s),
    lambda s: WINAConfig(sparsity=s, mode="topk"),
    lambda s: RSparseConfig(sparsity=s, rank=8),
]


@torch.inference_mode()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=CALIB[:2]).logits  # (2, T, V)


@pytest.mark.parametrize("make", CONFIGS)
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_measured_sparsity_matches_target(tiny_llama, make, sparsity: float) -> None:
    cfg = make(sparsity)
    sparsify_(tiny_llama, cfg, calibration=CALIB)
    measured = measure_sparsity(tiny_llama, CALIB)
    state = get_state(tiny_llama)
    assert set(measured) == {s.module for s in state.sites} and measured
    for name, got in measured.items():
        assert abs(got - sparsity) < 0.06, (cfg.kind, name, got)


@pytest.mark.parametrize("make", CONFIGS)
def test_sparsity_zero_leaves_the_output_unchanged(tiny_llama, make) -> None:
    dense = logits(tiny_llama)
    sparsify_(tiny_llama, make(0.0), calibration=CALIB)
    torch.testing.assert_close(logits(tiny_llama), dense, atol=1e-5, rtol=1e-5)
    remove(tiny_llama)
    torch.testing.assert_close(logits(tiny_llama), dense, atol=0, rtol=0)


def test_sparsity_changes_the_output_and_remove_restores_it(tiny_llama) -> None:
    dense = logits(tiny_llama)
    sparsify_(tiny_llama, TEALConfig(sparsity=0.5), calibration=CALIB)
    assert not torch.allclose(logits(tiny_llama), dense, atol=1e-3)
    sparsify_(tiny_llama, CATSConfig(sparsity=0.5), calibration=CALIB)  # replaces, recalibrates on dense
    assert all(w == "gate_act" for w, _ in activation_thresholds(tiny_llama).values())
    remove(tiny_llama)
    torch.testing.assert_close(logits(tiny_llama), dense, atol=0, rtol=0)


def test_rsparse_full_rank_reproduces_the_dense_model(tiny_llama) -> None:
    dense = logits(tiny_llama)
    sparsify_(tiny_llama, RSparseConfig(sparsity=0.6, rank=128), calibration=CALIB)
    torch.testing.assert_close(logits(tiny_llama), dense, atol=1e-4, rtol=1e-4)


def test_wina_equal_column_norms_equals_teal_topk(tiny_llama) -> None:
    sparsify_(tiny_llama, WINAConfig(sparsity=0.5, mode="topk"))  # top-k needs no calibration
    sites = get_state(tiny_llama).sites
    for s in sites:
        s.scale = torch.ones_like(s.scale)
    wina = logits(tiny_llama)
    teal_topk = [Site(s.module, "input", keep=s.keep) for s in sites]  # top-k of |x| alone
    install(tiny_llama, {"kind": "teal-topk"}, teal_topk)
    torch.testing.assert_close(logits(tiny_llama), wina, atol=0, rtol=0)


def test_chess_sparsifies_only_q_o_and_the_gate(tiny_llama) -> None:
    sparsify_(tiny_llama, CHESSConfig(sparsity=0.5), calibration=CALIB)
    th = activation_thresholds(tiny_llama)
    assert {n.rpartition(".")[2] for n in th} == {"q_proj", "o_proj", "gate_proj"}
    for where, t in th.values():
        assert t.dim() == (1 if where == "gate_act" else 0)  # channel-wise only in the MLP


def test_filter_fn_restricts_the_modules(tiny_llama) -> None:
    sparsify_(tiny_llama, TEALConfig(0.5), calibration=CALIB, filter_fn=lambda m, n: "layers.0." in n)
    names = activation_thresholds(tiny_llama)
    assert names and all("layers.0." in n for n in names)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TEALConfig(sparsity=1.0),
        lambda: TEALConfig(sparsity=-0.1),
        lambda: TEALConfig(sparsity=0.5, targets=("q", "mlp")),
        lambda: TEALConfig(sparsity=0.5, targets=()),
        lambda: CATSConfig(sparsity=0.5, targets=("q",)),
        lambda: CHESSConfig(sparsity=0.5, targets=("down",)),
        lambda: WINAConfig(sparsity=0.5, mode="bottomk"),
        lambda: RSparseConfig(sparsity=0.5, rank=-1),
        lambda: TEALConfig(sparsity=0.5, calib_tokens=0),
    ],
)
def test_bad_configs_raise(build) -> None:
    with pytest.raises(SparselandError):
        build()


def test_bad_use_raises(tiny_llama) -> None:
    with pytest.raises(SparselandError, match="calibration"):
        sparsify_(tiny_llama, TEALConfig(0.5))
    with pytest.raises(SparselandError, match="rank"):
        sparsify_(tiny_llama, RSparseConfig(0.9, rank=64, match_compute=True), calibration=CALIB)
    with pytest.raises(SparselandError, match="no activation sparsity"):
        measure_sparsity(make_tiny_llama(), CALIB)


def test_configs_round_trip_json() -> None:
    for make in CONFIGS:
        cfg = make(0.4)
        assert SparsityConfig.from_json(cfg.to_json()) == cfg


def test_cli_parser_builds_and_validates() -> None:
    import argparse

    from sparseland.activations.cli import add_commands, make_config

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["activations", "--method", "chess", "--sparsity", "0.5"])
    assert args.method == "chess" and make_config(args.method, args.sparsity).kind == "chess"
    with pytest.raises(SystemExit):
        parser.parse_args(["activations", "--sparsity", "1.5"])
