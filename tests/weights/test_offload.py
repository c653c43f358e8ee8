"""Out-of-core pruning (weights/offload.py) on tiny random Llamas saved as safetensors: the checkpoint
equals the in-memory driver's, resume after a crash equals an uninterrupted run, errors are clear."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseland import sparsify_
from sparseland.errors import SparselandError
from sparseland.runtime.checkpoint import WEIGHTS_FILE, load_sparse_checkpoint, read_manifest
from sparseland.weights import MagnitudeConfig, SparseGPTConfig, WandaConfig
from sparseland.weights.offload import (
    assemble_safetensors,
    iter_checkpoint_blocks,
    prune_offload,
    work_dir_for,
)
from tests.conftest import make_tiny_llama

LAYERS = 3
CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "src"
    make_tiny_llama(layers=LAYERS).save_pretrained(path)
    return path


def in_memory(cfg):
    model = make_tiny_llama(layers=LAYERS)
    sparsify_(model, cfg, calibration=CALIB)
    return model.state_dict()


def loaded(path):
    return load_sparse_checkpoint(path)[0].state_dict()


@pytest.mark.parametrize(
    "cfg",
    [WandaConfig(), SparseGPTConfig(pattern="2:4"), SparseGPTConfig(quant="int4-g32")],
    ids=["wanda", "sparsegpt-2:4", "sparsegpt-int4"],
)
def test_one_micro_batch_is_bit_identical_to_in_memory(src, tmp_path, cfg):
    report = prune_offload(src, cfg, tmp_path / "out", CALIB, calib_batch=CALIB.shape[0], progress=False)
    ref, got = in_memory(cfg), loaded(tmp_path / "out")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert report.overall_sparsity >= 0.5 - 1e-9  # int4 rounding can zero a few more
    assert not work_dir_for(tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("cfg", "micro"), [(WandaConfig(), 1), (SparseGPTConfig(), 4)], ids=["wanda-micro1", "sparsegpt-micro4"]
)
def test_micro_batches_give_the_same_masks_and_weights(src, tmp_path, cfg, micro):
    prune_offload(src, cfg, tmp_path / "out", CALIB, calib_batch=micro, progress=False)
    ref, got = in_memory(cfg), loaded(tmp_path / "out")
    for k in ref:
        assert torch.equal(ref[k] == 0, got[k] == 0), k  # the same masks
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)  # statistics summed in another order


def test_without_calibration(src, tmp_path):
    prune_offload(src, MagnitudeConfig(sparsity=0.6), tmp_path / "out", progress=False)
    ref, got = in_memory(MagnitudeConfig(sparsity=0.6)), loaded(tmp_path / "out")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


class Crash(Exception):
    pass


def crash_after(k):
    def hook(i):
        if i == k:
            raise Crash

    return hook


@pytest.mark.parametrize("cfg", [SparseGPTConfig()], ids=["sparsegpt"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(src, tmp_path, cfg):
    prune_offload(src, cfg, tmp_path / "whole", CALIB, calib_batch=2, progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        prune_offload(src, cfg, out, CALIB, calib_batch=2, progress=False, on_block_done=crash_after(1))
    assert not out.exists() and work_dir_for(out).is_dir()
    with pytest.raises(SparselandError, match="--resume"):
        prune_offload(src, cfg, out, CALIB, calib_batch=2, progress=False)
    with pytest.raises(SparselandError, match="other settings"):
        prune_offload(src, cfg, out, CALIB, calib_batch=3, progress=False, resume=True)
    report = prune_offload(src, cfg, out, CALIB, calib_batch=2, progress=False, resume=True)
    assert report.resumed_from == 2 and len(report.block_seconds) == LAYERS - 2
    assert (out / WEIGHTS_FILE).read_bytes() == (tmp_path / "whole" / WEIGHTS_FILE).read_bytes()
    assert read_manifest(out)["tensors"] == read_manifest(tmp_path / "whole")["tensors"]


KILL = """
import os, sys, torch
from sparseland.weights import WandaConfig
from sparseland.weights.offload import prune_offload
calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
prune_offload(sys.argv[1], WandaConfig(), sys.argv[2], calib, calib_batch=2, progress=False,
              on_block_done=lambda i: os.kill(os.getpid(), 9) if i == 0 else None)
"""


def test_resume_after_kill_9(src, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILL, str(src), str(out)], env=env, capture_output=True, timeout=900)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    report = prune_offload(src, WandaConfig(), out, CALIB, calib_batch=2, progress=False, resume=True)
    assert report.resumed_from == 1
    ref = in_memory(WandaConfig())
    got = loaded(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)


def test_bf16_shards_keep_their_dtype_and_load_block_by_block(tmp_path):
    model = make_tiny_llama(layers=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    prune_offload(tmp_path / "bf16", WandaConfig(), tmp_path / "out", CALIB, calib_batch=3, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert {r["dtype"] for r in manifest["tensors"].values()} == {"bfloat16"}
    blocks = list(iter_checkpoint_blocks(tmp_path / "out"))
    assert [k for k, _ in blocks] == [None, 0, 1]
    for k, tensors in blocks[1:]:
        w = tensors[f"model.layers.{k}.mlp.down_proj.weight"]
        assert w.dtype == torch.bfloat16 and ((w == 0).sum(1) == w.shape[1] // 2).all()
    full = loaded(tmp_path / "out")
    for _, tensors in blocks:
        for name, t in tensors.items():
            assert torch.equal(full[name], t.float()), name


def test_assemble_safetensors_streams_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    a = {"x": torch.arange(10.0), "y": torch.ones(3, 2, dtype=torch.bfloat16)}
    b = {"z": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    assemble_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "all.safetensors")
    got = load_file(str(tmp_path / "all.safetensors"))
    assert got.keys() == {"x", "y", "z"}
    assert all(torch.equal(got[k], {**a, **b}[k]) for k in got)


def test_errors(src, tmp_path):
    with pytest.raises(SparselandError, match="owl"):
        prune_offload(src, WandaConfig(allocation="owl"), tmp_path / "o", CALIB, progress=False)
    with pytest.raises(SparselandError, match="calib_batch"):
        prune_offload(src, WandaConfig(), tmp_path / "o", CALIB, calib_batch=0, progress=False)
    with pytest.raises(SparselandError, match="calibration"):
        prune_offload(src, WandaConfig(), tmp_path / "o", None, progress=False)
    with pytest.raises(SparselandError, match="config.json"):
        prune_offload(tmp_path, WandaConfig(), tmp_path / "o", CALIB, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(SparselandError, match="already exists"):
        prune_offload(src, WandaConfig(), tmp_path / "exists", CALIB, progress=False)


def test_cli_flags(src, tmp_path, capsys):
    from sparseland.cli import main

    assert main(["prune", "--model", str(src), "--resume", "--out", str(tmp_path / "o")]) == 2
    assert "--offload" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--offload", "--eval", "--out", str(tmp_path / "o")]) == 2
    assert "--eval" in capsys.readouterr().err
    # the tiny model has no tokenizer to make calibration windows with: a one-line error saying so
    assert main(["prune", "--model", str(src), "--offload", "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["prune", "--model", str(tmp_path), "--offload", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_heap_trimmed_after_every_block(src, tmp_path, monkeypatch):
    """The C heap's free memory goes back to the system after each block (the peak must not creep)."""
    import sparseland.weights.offload.driver as driver
    from sparseland.weights.offload.state import trim_heap

    calls = []
    monkeypatch.setattr(driver, "trim_heap", lambda: calls.append(1))
    prune_offload(src, MagnitudeConfig(sparsity=0.5), tmp_path / "out", progress=False)
    import json

    assert len(calls) == json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"]
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):  # glibc
        assert trim_heap() is True
