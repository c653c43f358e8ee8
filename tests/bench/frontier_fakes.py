"""Cheap stand-ins for the frontier tests: a tiny random Llama, random token windows, and fake pruning
runners (magnitude / random / a calibration-using one) registered under the grid's method names.

Also runnable as a script (``python frontier_fakes.py OUT_DIR SLEEP``) so a test can kill -9 a run.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from sparseland.bench.frontier import (
    Cell,
    FrontierSettings,
    Runner,
    Workload,
    build_grid,
    measured_sparsity,
)


def _load_tests_conftest():
    """tests/conftest.py by path (the name ``conftest`` is ambiguous: tests/bench has one too)."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("sparseland_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tiny_llama = _load_tests_conftest().make_tiny_llama
SETTINGS = FrontierSettings(model="tiny-llama", seq_len=32, eval_windows=4, calib_windows=2, batch_size=2)
CALLS: list[str] = []  # labels of the cells the fake runners applied, in order
SLEEP = [0.0]  # seconds each fake runner sleeps (to make a run slow enough to kill mid-grid)


def workload(settings: FrontierSettings) -> Workload:
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (settings.eval_windows, settings.seq_len), generator=gen)  # (N, T)
    calib = torch.randint(0, 256, (settings.calib_windows, settings.seq_len), generator=gen)
    return Workload(model=make_tiny_llama(), eval_windows=windows, calibration=lambda: calib)


def _prune(model: torch.nn.Module, cell: Cell, score) -> None:
    """Zero the lowest-``score`` entries of each Linear weight (but the output head), per ``cell``."""
    head = model.get_output_embeddings().weight
    for mod in model.modules():
        if not isinstance(mod, torch.nn.Linear) or mod.weight is head:
            continue
        w = mod.weight.data  # (out, in)
        s = score(w)
        if cell.pattern == "unstructured":
            k = int(w.numel() * cell.sparsity)
            idx = s.flatten().argsort()[:k]
            w.view(-1)[idx] = 0
        else:
            n, m = (int(x) for x in cell.pattern.split(":"))
            groups = s.reshape(-1, m)  # (out * in / M, M)
            drop = groups.argsort(dim=1)[:, : m - n]
            w.view(-1, m).scatter_(1, drop, 0.0)


def _fake(kind: str):
    def apply(model, cell, workload):
        CALLS.append(cell.label)
        time.sleep(SLEEP[0])
        if kind == "random":
            gen = torch.Generator().manual_seed(0)
            _prune(model, cell, lambda w: torch.rand(w.shape, generator=gen))
        elif kind == "magnitude":
            _prune(model, cell, lambda w: w.abs())
        else:  # "calib": a Wanda-like score that uses the calibration windows
            x = workload.calibration().float().std()
            _prune(model, cell, lambda w: w.abs() * x)
        return {"kind": kind}

    return apply


def runners(calib_version: str = "1") -> dict[str, Runner]:
    """Fake runners for the baselines and a 'fakewanda' method."""
    return {
        "random": Runner(apply=_fake("random")),
        "magnitude": Runner(apply=_fake("magnitude")),
        "fakewanda": Runner(apply=_fake("calib"), version=calib_version),
    }


def speed(model: torch.nn.Module) -> dict:
    """A deterministic fake speed: 'faster' the sparser the model."""
    return {"tokens_per_s": 100.0 / (1.0 - 0.5 * measured_sparsity(model)), "engine": "fake"}


speed.speed_id = "fake-speed"  # type: ignore[attr-defined]


def grid() -> list[Cell]:
    return build_grid(["fakewanda"], [0.5, 0.7], ["unstructured", "2:4"])


if __name__ == "__main__":  # a run to be killed: python frontier_fakes.py OUT_DIR SLEEP
    from sparseland.bench.frontier import RUNNERS, run_frontier

    torch.set_num_threads(1)
    RUNNERS.update(runners())
    SLEEP[0] = float(sys.argv[2])
    run_frontier(grid(), SETTINGS, sys.argv[1], measure_speed=speed, workload_fn=workload, progress=False)
