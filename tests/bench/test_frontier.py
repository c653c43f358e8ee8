"""The frontier sweep with fake runners on a tiny random Llama: grid, keys, resume, invalidation,
kill -9 mid-grid, size estimate and speed measurement."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import frontier_fakes as ff
import pytest
import torch

from sparseland.bench.frontier import (
    RUNNERS,
    Cell,
    FrontierSettings,
    GreedyDecodeSpeed,
    Runner,
    build_grid,
    cell_key,
    estimate_model_bytes,
    run_frontier,
)
from sparseland.bench.store import STORE_NAME, open_store
from sparseland.errors import SparselandError

TIMINGS = {"eval_seconds", "method_seconds", "finished_at", "speed", "dense_speed"}


@pytest.fixture
def fakes(monkeypatch):
    """Register the fake runners (restored after the test) and reset the call log."""
    for name, runner in ff.runners().items():
        monkeypatch.setitem(RUNNERS, name, runner)
    ff.CALLS.clear()
    ff.SLEEP[0] = 0.0
    return ff


def _run(out, **kw):
    return run_frontier(
        ff.grid(), ff.SETTINGS, out, measure_speed=ff.speed, workload_fn=ff.workload, progress=False, **kw
    )


def _strip(results: list[dict]) -> dict[str, dict]:
    return {r["key"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in results}


def _same(a: list[dict], b: list[dict]) -> None:
    sa, sb = _strip(a), _strip(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        ra, rb = sa[key], sb[key]
        assert math.isclose(ra.pop("perplexity"), rb.pop("perplexity"), rel_tol=1e-5)
        assert math.isclose(ra.pop("nll"), rb.pop("nll"), rel_tol=1e-5)
        for k in ("kl_mean", "kl_p99"):
            assert math.isclose(ra.pop(k), rb.pop(k), rel_tol=1e-4, abs_tol=1e-7)
        assert ra == rb


def test_grid_always_has_baselines_and_nm_fixes_sparsity(fakes):
    cells = build_grid(["fakewanda"], [0.5, 0.7], ["unstructured", "2:4"])
    labels = [c.label for c in cells]
    assert labels[0] == "dense"
    assert "random 70% unstructured" in labels and "magnitude 50% 2:4" in labels
    assert sum(c.pattern == "2:4" for c in cells) == 3  # one per method, sparsity 0.5
    assert len(labels) == len(set(labels)) == 1 + 3 * 2 + 3


def test_runner_without_nm_gets_unstructured_cells_only(fakes, monkeypatch):
    monkeypatch.setitem(RUNNERS, "act", Runner(apply=lambda m, c, w: None, family="activations", nm_patterns=False))
    cells = build_grid(["act"], [0.5], ["unstructured", "2:4"])
    assert [c.pattern for c in cells if c.method == "act"] == ["unstructured"]


@pytest.mark.parametrize(
    "args, match",
    [
        ((["nope"], [0.5], ["unstructured"]), "unknown frontier method 'nope'"),
        ((["random"], [1.5], ["unstructured"]), "outside"),
        ((["random"], [0.5], ["4:2"]), "not 'unstructured' or 'N:M'"),
        ((["random"], [], ["unstructured"]), "needs sparsities"),
        ((["random"], [0.5], []), "no patterns"),
    ],
)
def test_grid_bad_input(args, match):
    with pytest.raises(SparselandError, match=match):
        build_grid(*args)


def test_key_depends_on_cell_settings_and_version(fakes, monkeypatch):
    cell = Cell("fakewanda", 0.5)
    key = cell_key(cell, ff.SETTINGS, "s")
    assert key == cell_key(Cell("fakewanda", 0.5), ff.SETTINGS, "s")
    assert key != cell_key(Cell("fakewanda", 0.5, options={"allocation": "owl"}), ff.SETTINGS, "s")
    assert key != cell_key(cell, FrontierSettings(model="tiny-llama", seq_len=64), "s")
    assert key != cell_key(cell, ff.SETTINGS, None)
    assert key == cell_key(cell, FrontierSettings(**{**ff.SETTINGS.__dict__, "batch_size": 3}), "s")
    monkeypatch.setitem(RUNNERS, "fakewanda", ff.runners(calib_version="2")["fakewanda"])
    assert key != cell_key(cell, ff.SETTINGS, "s")


def test_run_then_rerun_computes_nothing(fakes, tmp_path):
    results = _run(tmp_path)
    assert len(results) == len(ff.grid()) == len(ff.CALLS) + 1  # dense runs no method
    r = {x["label"]: x for x in results}
    assert r["dense"]["measured_sparsity"] == 0
    assert abs(r["magnitude 70% unstructured"]["measured_sparsity"] - 0.7) < 0.01
    assert r["magnitude 50% 2:4"]["model_bytes"] < r["dense"]["model_bytes"]
    loads = []
    again = run_frontier(
        ff.grid(),
        ff.SETTINGS,
        tmp_path,
        measure_speed=ff.speed,
        progress=False,
        workload_fn=lambda s: loads.append(s) or ff.workload(s),
    )
    assert loads == [] and len(ff.CALLS) == len(results) - 1
    _same(results, again)


def test_changed_code_version_invalidates_only_its_cells(fakes, tmp_path, monkeypatch):
    first = _run(tmp_path)
    ff.CALLS.clear()
    monkeypatch.setitem(RUNNERS, "fakewanda", ff.runners(calib_version="2")["fakewanda"])
    second = _run(tmp_path)
    assert sorted(ff.CALLS) == sorted(c.label for c in ff.grid() if c.method == "fakewanda")
    unchanged = {r["key"] for r in first} & {r["key"] for r in second}
    assert len(unchanged) == len(first) - len(ff.CALLS)


def test_resume_after_kill_9_matches_an_uninterrupted_run(fakes, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = Path(ff.__file__)
    root = script.resolve().parents[2]  # the checkout under test, not whichever sparseland is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), str(root)])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed), "0.25"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    n_total, stored = len(ff.grid()), 0
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (killed / STORE_NAME).is_file():
                try:
                    db = sqlite3.connect(killed / STORE_NAME, timeout=5)
                    stored = db.execute("SELECT count(*) FROM cells").fetchone()[0]
                    db.close()
                except sqlite3.OperationalError:  # schema not created yet
                    stored = 0
                if stored >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with open_store(killed) as store:  # not corrupted, and really interrupted mid-grid
        done = len(store.keys())
    assert 2 <= done < n_total
    resumed = _run(killed)
    assert len(ff.CALLS) <= n_total - done  # finished cells were not recomputed
    ff.CALLS.clear()
    _same(resumed, _run(clean))


def test_estimate_model_bytes_counts_bitmask_and_nonzeros():
    lin = torch.nn.Linear(64, 32, bias=False)
    dense = estimate_model_bytes(lin)
    assert dense == 64 * 32 * 4
    with torch.no_grad():
        lin.weight[:, :48] = 0  # 75% zeros
    assert estimate_model_bytes(lin) == 64 * 32 // 8 + 16 * 32 * 4


def test_greedy_decode_speed_on_tiny_llama():
    out = GreedyDecodeSpeed(n_tokens=4, prompt_len=4, warmup=1)(ff.make_tiny_llama())
    assert out["tokens_per_s"] > 0 and out["tokens"] == 4


def test_ctrl_c_mid_grid_keeps_finished_cells(fakes, tmp_path, monkeypatch):
    def interrupt(model, cell, workload):
        raise KeyboardInterrupt

    monkeypatch.setitem(RUNNERS, "fakewanda", Runner(apply=interrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    with open_store(tmp_path) as store:
        assert len(store.keys()) == 3  # dense, random and magnitude at 50% finished first
    monkeypatch.setitem(RUNNERS, "fakewanda", ff.runners()["fakewanda"])
    ff.CALLS.clear()
    assert len(_run(tmp_path)) == len(ff.grid()) and len(ff.CALLS) == len(ff.grid()) - 3


@pytest.mark.skipif(importlib.util.find_spec("sparseland.runtime.generate") is None, reason="no runtime loop")
def test_runtime_decode_speed_on_tiny_llama():
    from sparseland.bench.frontier import RuntimeDecodeSpeed

    speed = RuntimeDecodeSpeed(n_tokens=3, prompt_len=4, warmup=1)
    model = ff.make_tiny_llama()
    out = speed(model)
    assert out["tokens_per_s"] > 0 and out["formats"] == {"dense": 4 * 2 + 3 * 2}
    assert speed(model)["formats"] == out["formats"]  # the converted copy is reused


def test_activation_runner_cell_on_tiny_llama(tmp_path):
    """The real TEAL runner: no weight zeros, the measured sparsity is that of the activations, speed is
    timed in interleaved rounds (the median round kept, every round recorded)."""
    calls = []

    def speed(model):
        calls.append(model)
        return {"tokens_per_s": float(len(calls))}

    cells = [Cell("dense", 0.0, "dense"), Cell("teal", 0.5)]
    res = run_frontier(cells, ff.SETTINGS, tmp_path, measure_speed=speed, workload_fn=ff.workload, progress=False)
    teal = res[1]
    assert teal["family"] == "activations" and teal["cell"]["method"] == "teal"
    assert 0.3 < teal["measured_sparsity"] < 0.7  # zeroed activations on the eval data, target 50%
    assert teal["perplexity"] != res[0]["perplexity"]
    assert len(teal["speed"]["rounds"]) == 3 and len(teal["dense_speed"]["rounds"]) == 3
    assert teal["speed"]["tokens_per_s"] == sorted(teal["speed"]["rounds"])[1]
    assert all(c.method != "teal" or c.pattern == "unstructured" for c in build_grid(["teal"], [0.5], ["2:4"]))


@pytest.mark.parametrize("method", ["streaming", "flexprefill"])
def test_attention_runner_cell_on_tiny_llama(tmp_path, method):
    from sparseland.bench.frontier import run_cell
    from sparseland.bench.measure import RuntimeDecodeSpeed

    wl = ff.workload(ff.SETTINGS)
    res = run_cell(wl.model, Cell(method, 0.5), wl, ff.SETTINGS, RuntimeDecodeSpeed(3, 4, 1), speed_rounds=1)
    assert res["family"] == "attention" and 0.0 <= res["measured_sparsity"] < 1.0
    assert res["speed"]["tokens_per_s"] > 0 and res["model_bytes"] > 0
    assert all(
        c.pattern == "unstructured" for c in build_grid([method], [0.5], ["unstructured", "2:4"]) if c.method == method
    )


def test_quantization_cells_and_joint_combinations():
    cells = build_grid(["int4", "sparsegpt+int4"], [0.5, 0.7], ["unstructured"])
    labels = [c.label for c in cells]
    assert labels.count("int4") == 1  # quantization alone: one cell, whatever the sparsities
    assert "sparsegpt+int4 50% unstructured" in labels and "sparsegpt+int4 70% unstructured" in labels


def test_sparsegpt_int4_cell_prunes_and_quantizes_jointly():
    from sparseland.bench.frontier import Workload, get_runner
    from sparseland.quant import quant_state
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    workload = Workload(model=model, eval_windows=calib, calibration=lambda: calib)
    get_runner("sparsegpt+int4").apply(model, Cell("sparsegpt+int4", 0.5, "unstructured"), workload)
    qw = quant_state(model.model.layers[0].mlp.down_proj)
    assert qw is not None and qw.scheme.name == "int4-g32" and qw.mask is not None
    assert float(qw.mask.float().mean()) == pytest.approx(0.5, abs=0.02)
    get_runner("int4").apply(m2 := make_tiny_llama(), Cell("int4", 0.0, "dense"), workload)
    assert quant_state(m2.model.layers[1].self_attn.q_proj).mask is None
