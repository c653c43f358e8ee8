"""Thresholds, scales and low-rank factors survive save and load bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from sparseland import sparsify_
from sparseland.activations import (
    CHESSConfig,
    RSparseConfig,
    TEALConfig,
    WINAConfig,
    activation_state_dict,
    get_state,
    load_activation_state,
    load_activation_state_dict,
    save_activation_state,
)
from sparseland.errors import SparselandError
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))  # (N, T)


@pytest.mark.parametrize(
    "cfg",
    [
        CHESSConfig(0.5),
        RSparseConfig(0.5, rank=4),
        WINAConfig(0.4, mode="topk"),
        WINAConfig(0.4),
        TEALConfig(0.3),
    ],
)
def test_save_and_load_round_trip(tmp_path, cfg) -> None:
    model = make_tiny_llama()
    sparsify_(model, cfg, calibration=CALIB)
    with torch.inference_mode():
        before = model(input_ids=CALIB[:2]).logits
    path = save_activation_state(model, tmp_path / "act.safetensors")
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically

    fresh = make_tiny_llama()
    load_activation_state(fresh, path)
    a, b = get_state(model), get_state(fresh)
    assert a.config == b.config == json.loads(cfg.to_json())
    for sa, sb in zip(a.sites, b.sites, strict=True):
        assert (sa.module, sa.where, sa.keep) == (sb.module, sb.where, sb.keep)
        for name, t in sa.tensors().items():
            assert torch.equal(t, sb.tensors()[name])
    with torch.inference_mode():
        torch.testing.assert_close(fresh(input_ids=CALIB[:2]).logits, before, atol=0, rtol=0)


def test_state_dict_embeds_and_reloads() -> None:
    model = make_tiny_llama()
    sparsify_(model, TEALConfig(0.5), calibration=CALIB)
    tensors, header = activation_state_dict(model)
    assert header["format"] == "sparseland-activations" and all("::" in k for k in tensors)
    fresh = make_tiny_llama()
    load_activation_state_dict(fresh, tensors, header)
    assert len(get_state(fresh).sites) == len(header["sites"])


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SparselandError, match="does not exist"):
        load_activation_state(make_tiny_llama(), tmp_path / "missing.safetensors")
    with pytest.raises(SparselandError, match="no activation sparsity"):
        save_activation_state(make_tiny_llama(), tmp_path / "x.safetensors")
    model = make_tiny_llama()
    sparsify_(model, CHESSConfig(0.5), calibration=CALIB)
    path = save_activation_state(model, tmp_path / "chess.safetensors")
    with pytest.raises(SparselandError):  # a model of another width
        load_activation_state(make_tiny_llama(intermediate=96), path)
