"""MoE-fied checkpoints round-trip; `sparseland moefy` end to end; config errors are one line."""

import copy
import json

import pytest
import torch

from sparseland import sparsify_
from sparseland.cli import main
from sparseland.errors import SparselandError
from sparseland.moe import MoEfyConfig, MoEMLP, moe_layers
from sparseland.moe.recover import recover_
from sparseland.runtime.checkpoint import load_sparse_checkpoint, save_sparse_checkpoint
from tests.models.test_loader import _word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("router,routing", [("analytic", "topk"), ("learned", "threshold")])
def test_checkpoint_round_trip_is_exact(tmp_path, tiny_llama, router, routing):
    cfg = MoEfyConfig(experts=8, active=0.5, router=router, routing=routing, router_steps=20, chunk=2)
    sparsify_(tiny_llama, cfg, calibration=CALIB)
    path = save_sparse_checkpoint(tiny_llama, None, tmp_path / "m", metadata={})
    loaded, _ = load_sparse_checkpoint(path)
    assert set(moe_layers(loaded)) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert moe_layers(loaded)["model.layers.0.mlp"].spec() == moe_layers(tiny_llama)["model.layers.0.mlp"].spec()
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_llama(x).logits)


def test_checkpoint_with_a_bad_moe_spec_is_an_error(tmp_path, tiny_llama):
    sparsify_(tiny_llama, MoEfyConfig(experts=8, active=0.5), calibration=CALIB)
    path = save_sparse_checkpoint(tiny_llama, None, tmp_path / "m", metadata={})
    manifest = json.loads((path / "sparseland.json").read_text())
    manifest["moe"]["model.layers.0.mlp"]["expert_size"] = 7
    (path / "sparseland.json").write_text(json.dumps(manifest))
    with pytest.raises(SparselandError, match="does not cover"):
        load_sparse_checkpoint(path)


def test_moefy_cli_writes_a_loadable_checkpoint(tmp_path, tiny_llama, capsys):
    ck = save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "dense", metadata={})
    out = tmp_path / "moe"
    args = ["moefy", "--model", str(ck), "--experts", "8", "--active", "0.75", "--construction", "kmeans"]
    assert main([*args, "--seq-len", "16", "--calib-samples", "4", "--eval", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moefied     2 MLPs into 8 experts" in printed and "perplexity" in printed
    model, _ = load_sparse_checkpoint(out)
    assert all(isinstance(layer.mlp, MoEMLP) for layer in model.model.layers)
    meta = json.loads((out / "sparseland.json").read_text())["metadata"]
    assert meta["method"]["kind"] == "moefy" and meta["eval"]["active"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"experts": 1}, "experts=1"),
        ({"active": 0.0}, "outside"),
        ({"construction": "spectral"}, "construction"),
        ({"shared_experts": 6, "active": 0.25}, "more than the active fraction"),
        ({"router": "oracle"}, "router"),
        ({"chunk": 0}, "chunk"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(SparselandError, match=match):
        MoEfyConfig(**kw)


def test_indivisible_experts_and_missing_calibration_are_clear(tiny_llama):
    with pytest.raises(SparselandError, match="calibration"):
        sparsify_(tiny_llama, MoEfyConfig(experts=8))
    with pytest.raises(SparselandError, match="not divisible"):
        sparsify_(tiny_llama, MoEfyConfig(experts=6, shared_experts=0), calibration=CALIB)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(
            ["moefy", "--construction", "cmoe", "--experts", "4", "--shared-experts", "4", "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1


def test_recovery_lowers_the_distillation_loss(tiny_llama):
    from sparseland.training.distill import kd_loss

    teacher = copy.deepcopy(tiny_llama)
    sparsify_(tiny_llama, MoEfyConfig(experts=8, active=0.25, construction="random"), calibration=CALIB)
    router_before = copy.deepcopy(tiny_llama.model.layers[0].mlp.router.state_dict())
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

    def kd():
        with torch.no_grad():
            return float(kd_loss(tiny_llama(windows).logits, teacher(windows).logits, 2.0))

    before = kd()
    recover_(tiny_llama, teacher, windows, 25, lr=1e-3, batch_size=4, progress=False)
    assert kd() < 0.5 * before
    for k, v in tiny_llama.model.layers[0].mlp.router.state_dict().items():
        assert torch.equal(v, router_before[k])  # routers stay frozen
