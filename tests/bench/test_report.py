"""The report renders from a small stored result set: markdown, self-contained HTML, non-empty PNGs."""

from __future__ import annotations

import pytest

from sparseland.bench.report import PLOTS, render_from_store, summary, text_table
from sparseland.bench.store import open_store
from sparseland.errors import SparselandError

DENSE_BYTES = 540_000_000


def _r(method: str, sparsity: float, pattern: str, ppl: float, tps: float | None) -> dict:
    cell = {"method": method, "sparsity": sparsity, "pattern": pattern, "options": {}}
    label = "dense" if method == "dense" else f"{method} {sparsity:.0%} {pattern}"
    return {
        "key": label,
        "cell": cell,
        "label": label,
        "perplexity": ppl,
        "nll": 1.0,
        "eval_windows": 16,
        "eval_seconds": 1.0,
        "method_seconds": 2.0,
        "measured_sparsity": sparsity,
        "bytes_source": "estimate",
        "model_bytes": int(DENSE_BYTES * (1 - sparsity / 2)),
        "finished_at": 0.0,
        "speed": {"tokens_per_s": tps, "engine": "test"} if tps else None,
    }


RESULTS = [
    _r("dense", 0.0, "dense", 12.0, 13.0),
    _r("random", 0.5, "unstructured", 5000.0, 13.1),
    _r("magnitude", 0.5, "unstructured", 80.0, 13.0),
    _r("wanda", 0.5, "unstructured", 20.0, 12.9),
    _r("random", 0.5, "2:4", 9000.0, 20.0),
    _r("magnitude", 0.5, "2:4", 300.0, 20.5),
    _r("wanda", 0.5, "2:4", 40.0, 19.5),
    _r("wanda", 0.7, "unstructured", 90.0, 14.0),
]


def _store(tmp_path, results, grid_extra=()):
    with open_store(tmp_path) as store:
        for r in results:
            store.put(r)
        store.set_meta("grid", [r["key"] for r in results] + list(grid_extra))
        store.set_meta("settings", {"model": "tiny", "seq_len": 512})


def test_report_renders_from_store(tmp_path):
    _store(tmp_path, RESULTS)
    results, paths, lines = render_from_store(tmp_path)
    assert [r["key"] for r in results] == [r["key"] for r in RESULTS]
    for name in PLOTS.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and "wanda" in html
    md = paths["md"].read_text()
    assert "| method |" in md and all(name in md for name in PLOTS.values())
    text = "\n".join(lines)
    assert "Weight sparsity at 50% unstructured: wanda wins" in text and "at 2:4 (50%): wanda wins" in text
    assert "1.67x dense" in text  # 20 / 12
    assert "speedup over dense ranges from 0.99x" in text and "1.58x" in text  # 20.5 / 13


def test_report_without_speed_and_with_missing_cells(tmp_path):
    no_speed = [{**r, "speed": None} for r in RESULTS[:4]]
    _store(tmp_path, no_speed, grid_extra=["not-finished"])
    _, paths, lines = render_from_store(tmp_path)
    text = "\n".join(lines)
    assert "not measured" in text and "1 of 5 cells have not finished" in text
    assert (tmp_path / PLOTS["speed"]).stat().st_size > 0
    assert "speedup" in text_table(no_speed)


def test_summary_without_dense():
    assert any("wanda wins" in line for line in summary(RESULTS[1:]))


def test_report_of_empty_store_is_a_clear_error(tmp_path):
    open_store(tmp_path).close()
    with pytest.raises(SparselandError, match="no finished frontier cells"):
        render_from_store(tmp_path)


def test_speedup_prefers_the_side_by_side_dense_measurement():
    from sparseland.bench.report import speedup

    r = {**RESULTS[3], "speed": {"tokens_per_s": 15.0}, "dense_speed": {"tokens_per_s": 10.0}}
    assert speedup(r, RESULTS[0]) == 1.5
    assert speedup({**r, "dense_speed": None}, RESULTS[0]) == 15.0 / 13.0


def test_fastest_configuration_at_each_quality_level():
    from sparseland.bench.report import fastest_by_quality

    results = [
        _r("dense", 0.0, "dense", 12.0, 13.0),
        {**_r("int4", 0.0, "dense", 12.0, 40.0), "label": "int4"},
        _r("sparsegpt+int4", 0.5, "unstructured", 18.0, 50.0),
        _r("wanda", 0.5, "2:4", 40.0, 70.0),
        _r("magnitude", 0.5, "unstructured", 13.0, 12.0),  # close to dense but slower than int4
    ]
    lines = fastest_by_quality(results)
    assert lines[0].startswith("Fastest within 1.01x dense perplexity: int4 (40 tokens/s")
    assert any(
        line.startswith("Fastest within 1.5x dense perplexity: sparsegpt+int4 50% unstructured") for line in lines
    )
    assert any("within 2x" not in line and "wanda" in line for line in lines) is False  # 40/12 = 3.3x: never listed
    assert len(lines) == 2  # levels with the same answer are not repeated
    assert fastest_by_quality([_r("wanda", 0.5, "2:4", 40.0, 70.0)]) == []  # no dense: no answer
