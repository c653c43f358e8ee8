"""Distributed calibration on a local Ray instance: two workers' summed statistics give the pruned weights
of one process (max abs difference <= 1e-5), for Wanda and SparseGPT."""

import pytest
import torch

from sparseland import sparsify_
from sparseland.runtime.checkpoint import load_sparse_checkpoint
from sparseland.weights import SparseGPTConfig, WandaConfig
from sparseland.weights.offload import prune_offload
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "src"
    make_tiny_llama(layers=2).save_pretrained(path)
    return path


@pytest.mark.parametrize("cfg", [WandaConfig(), SparseGPTConfig()], ids=["wanda", "sparsegpt"])
def test_two_workers_equal_one_process(ray_local, src, tmp_path, cfg):
    from sparseland.distributed.calibration import prune_distributed

    report = prune_distributed(src, cfg, tmp_path / "ray", CALIB, num_workers=2, calib_batch=2, progress=False)
    assert report.workers == 2
    local = prune_offload(src, cfg, tmp_path / "local", CALIB, calib_batch=2, progress=False)
    ref = make_tiny_llama(layers=2)
    sparsify_(ref, cfg, calibration=CALIB)
    got = load_sparse_checkpoint(tmp_path / "ray")[0].state_dict()
    one = load_sparse_checkpoint(tmp_path / "local")[0].state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k] == 0, v == 0), k
        assert (got[k] - one[k]).abs().max() <= 1e-5, k
        assert (got[k] - v).abs().max() <= 1e-5, k
    assert report.overall_sparsity == pytest.approx(local.overall_sparsity)
