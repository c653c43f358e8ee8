"""``run_frontier(executor="ray")`` on a local 2-CPU Ray instance with the real quick-set runners on a tiny
random Llama: the same store as a local run, resume, a lost worker's cell retried, and a clear message
when Ray is missing."""

import os
import sys
from pathlib import Path

import pytest
import torch

from sparseland.bench.frontier import FrontierSettings, Workload, build_grid, run_frontier
from sparseland.bench.store import open_store
from sparseland.errors import SparselandError
from tests.conftest import make_tiny_llama

SETTINGS = FrontierSettings(model="tiny-llama", seq_len=32, eval_windows=2, calib_windows=2, batch_size=2)
CELLS = build_grid(["wanda"], [0.5], ["unstructured"])  # dense, random, magnitude, wanda
TIMINGS = {"eval_seconds", "method_seconds", "finished_at", "speed", "dense_speed", "method_report"}


def tiny_workload(settings):
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (settings.eval_windows, settings.seq_len), generator=gen)
    calib = torch.randint(0, 256, (settings.calib_windows, settings.seq_len), generator=gen)
    return Workload(model=make_tiny_llama(), eval_windows=windows, calibration=lambda: calib)


class DieOnce:
    """A workload loader whose first call kills its worker process (a lost worker), later calls load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, settings):
        if not Path(self.marker).exists():
            Path(self.marker).touch()
            os._exit(1)
        return tiny_workload(settings)


def stripped(results):
    return {r["key"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in results}


def test_ray_gives_the_local_store_and_resumes(ray_local, tmp_path):
    local = run_frontier(CELLS, SETTINGS, tmp_path / "local", workload_fn=tiny_workload, progress=False)
    # a driver killed after two cells: those two are stored; the rerun computes only the others
    run_frontier(CELLS[:2], SETTINGS, tmp_path / "ray", workload_fn=tiny_workload, progress=False, executor="ray")
    with open_store(tmp_path / "ray") as store:
        first = {r["key"]: r["finished_at"] for r in store.results()}
    remote = run_frontier(CELLS, SETTINGS, tmp_path / "ray", workload_fn=tiny_workload, progress=False, executor="ray")
    assert {r["key"]: r["finished_at"] for r in remote if r["key"] in first} == first
    a, b = stripped(local), stripped(remote)
    assert a.keys() == b.keys() and len(a) == len(CELLS)
    for key in a:
        pa, pb = a[key].pop("perplexity"), b[key].pop("perplexity")
        assert pb == pytest.approx(pa, rel=1e-5)  # another process, maybe another thread count
        a[key].pop("nll"), b[key].pop("nll")
        assert a[key] == b[key]


def test_a_lost_workers_cell_is_retried(ray_local, tmp_path):
    load = DieOnce(str(tmp_path / "died"))
    res = run_frontier(CELLS[:1], SETTINGS, tmp_path / "out", workload_fn=load, progress=False, executor="ray")
    assert (tmp_path / "died").exists() and len(res) == 1 and res[0]["perplexity"] > 0


def test_without_ray_a_clear_install_message(monkeypatch, tmp_path, capsys):
    from sparseland.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    from sparseland.distributed import require_ray

    with pytest.raises(SparselandError, match=r"pip install -e \"\.\[ray\]\""):
        require_ray()
    assert main(["frontier", "--quick", "--executor", "ray", "--out", str(tmp_path / "f")]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
