"""Frontier combinations (``wanda+teal``) and the long-context column, on tiny random Llamas (seconds)."""

from __future__ import annotations

import dataclasses

import frontier_fakes as ff
import pytest

from sparseland.bench.frontier import (
    Cell,
    FrontierSettings,
    Workload,
    build_grid,
    cell_key,
    get_runner,
    run_cell,
    run_frontier,
    wants_longctx,
)
from sparseland.bench.report import summary, table
from sparseland.errors import SparselandError
from tests.data.test_longctx import StubTokenizer


def test_combined_runner_families_version_and_patterns():
    r = get_runner("teal+magnitude")  # written in any order, applied weights first
    assert r.family == "combined" and r.families == ("weights", "activations")
    assert r.version.startswith("magnitude:") and "teal:" in r.version
    grid = build_grid(["magnitude+teal", "teal+streaming"], [0.5], ["unstructured", "2:4"])
    nm = {c.method for c in grid if c.pattern == "2:4"}
    assert "magnitude+teal" in nm and "teal+streaming" not in nm  # no weights part: unstructured only


@pytest.mark.parametrize("method", ["wanda+sparsegpt", "teal+cats", "teal+", "nope+teal", "dense+teal"])
def test_bad_combinations_are_clear_errors(method):
    with pytest.raises(SparselandError, match="combin|unknown|empty"):
        get_runner(method)


def test_combined_cell_has_both_sparsities():
    wl = ff.workload(ff.SETTINGS)
    res = run_cell(wl.model, Cell("magnitude+teal", 0.5), wl, ff.SETTINGS, None)
    assert res["family"] == "combined"
    assert res["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0.3 < res["activation_sparsity"] < 0.7
    assert res["measured_sparsity"] == res["weight_sparsity"] and res["attention_sparsity"] is None
    assert set(res["method_report"]) == {"magnitude", "teal"}
    weights_only = run_cell(wl.model, Cell("magnitude", 0.5), wl, ff.SETTINGS, None)
    assert res["perplexity"] != weights_only["perplexity"]  # the activation part did something
    head, rows = table([res])
    assert rows[0][head.index("measured")].startswith("w 50% a ")


def _longctx_workload(settings: FrontierSettings) -> Workload:
    wl = ff.workload(settings)
    return dataclasses.replace(wl, model=ff.make_tiny_llama(max_pos=1024), tokenizer=StubTokenizer(vocab=256))


def test_longctx_only_on_dense_and_attention_cells_and_in_their_keys_only(tmp_path):
    on = dataclasses.replace(ff.SETTINGS, longctx_length=512)
    cells = [Cell("dense", 0.0, "dense"), Cell("streaming", 0.5), Cell("magnitude", 0.5), Cell("wanda+streaming", 0.5)]
    assert [wants_longctx(c, on) for c in cells] == [True, True, False, True]
    assert not any(wants_longctx(c, ff.SETTINGS) for c in cells)
    changed = [cell_key(c, on) != cell_key(c, ff.SETTINGS) for c in cells]
    assert changed == [True, True, False, True]  # turning it on leaves weight-only cells' results valid

    res = run_frontier(cells[:3], on, tmp_path, workload_fn=_longctx_workload, progress=False)
    dense, stream, mag = res
    for r in (dense, stream):
        lc = r["longctx"]
        assert lc["length"] == 512 and lc["samples"] == 3 and 0.0 <= lc["accuracy"] <= 100.0
        assert set(lc["tasks"]) == set(on.longctx_tasks)
    assert mag["longctx"] is None
    head, rows = table(res)
    assert head[-1] == "long-ctx acc" and rows[2][-1] == "-" and rows[0][-1].endswith("%")
    lines = summary(res)
    assert any(line.startswith("Long-context accuracy (3 needle-retrieval samples at 512 tokens)") for line in lines)


def test_longctx_without_tokenizer_is_a_clear_error():
    on = dataclasses.replace(ff.SETTINGS, longctx_length=512)
    wl = ff.workload(on)
    with pytest.raises(SparselandError, match="tokenizer"):
        run_cell(wl.model, Cell("dense", 0.0, "dense"), wl, on, None)


def test_settings_key_without_longctx_is_unchanged():
    """Stores written before the long-context column keep their keys (no longctx fields when off)."""
    d = FrontierSettings().key_dict()
    assert set(d) == {"model", "text", "seq_len", "eval_windows", "calib_windows", "seed"}


def test_speed_compares_like_with_like_decode_paths():
    """Dense may use the fused C++ step; a cell it cannot run (sparse attention) is timed on the Python
    step, and so is dense next to it. Threshold activation methods (TEAL) run fused on both sides."""
    from sparseland.bench.measure import RuntimeDecodeSpeed
    from sparseland.bench.report import speedup
    from sparseland.runtime import fastpath

    wl = ff.workload(ff.SETTINGS)
    speed = RuntimeDecodeSpeed(n_tokens=3, prompt_len=4, warmup=1)
    dense = speed(wl.model)
    assert dense["prefill_tokens_per_s"] > 0
    assert dense["path"] == ("fused" if fastpath.available() else "python")
    assert speed(wl.model, path="python")["path"] == "python"
    with pytest.raises(SparselandError, match="path="):
        speed(wl.model, path="gpu")
    res = run_cell(wl.model, Cell("streaming", 0.5), wl, ff.SETTINGS, speed, speed_rounds=1)
    assert res["speed"]["path"] == "python" and res["dense_speed"]["path"] == "python"
    teal = run_cell(wl.model, Cell("teal", 0.5), wl, ff.SETTINGS, speed, speed_rounds=1)
    assert teal["speed"]["path"] == teal["dense_speed"]["path"] == dense["path"]
    assert speedup(res, None) == pytest.approx(res["speed"]["tokens_per_s"] / res["dense_speed"]["tokens_per_s"])
    mag = run_cell(wl.model, Cell("magnitude", 0.5), wl, ff.SETTINGS, speed, speed_rounds=1)
    assert mag["speed"]["path"] == mag["dense_speed"]["path"] == dense["path"]
    with pytest.raises(SparselandError, match="cannot use the fused"):
        wl2 = ff.workload(ff.SETTINGS)
        from sparseland import sparsify_
        from sparseland.activations.cli import make_config

        sparsify_(wl2.model, make_config("wina-topk", 0.5), calibration=wl2.calibration())
        if not fastpath.available():
            raise SparselandError("cannot use the fused step (extension not built)")
        speed(wl2.model, path="fused")
