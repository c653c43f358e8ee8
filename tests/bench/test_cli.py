"""The frontier CLI: bad input exits 2 with one line; a full run with fakes writes a report that
``sparseland report`` re-renders; the real weight runners work end to end on a tiny Llama."""

from __future__ import annotations

import importlib.util

import frontier_fakes as ff
import pytest

from sparseland.bench import frontier
from sparseland.bench.store import STORE_NAME
from sparseland.cli import main


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparseland: error:") and match in err, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sparsities", "1.5"], "outside (0, 1)"),
        (["--sparsities", "half"], "not a number"),
        (["--methods", "nope"], "unknown frontier method 'nope'"),
        (["--patterns", "4:2"], "N:M"),
        (["--patterns", ","], "empty"),
        (["--methods", "wanda+sparsegpt"], "at most one method per family"),
        (["--longctx-length", "-1"], "negative"),
    ],
)
def test_frontier_bad_input(capsys, tmp_path, extra, match):
    _one_line_error(capsys, ["frontier", "--out", str(tmp_path / "o"), *extra], match)


def test_bad_stores_and_dirs(capsys, tmp_path):
    _one_line_error(capsys, ["report", str(tmp_path / "missing")], "does not exist")
    (tmp_path / STORE_NAME).write_bytes(b"\x00garbage" * 64)
    _one_line_error(capsys, ["report", str(tmp_path)], "not a usable sparseland results store")
    _one_line_error(capsys, ["frontier", "--out", str(tmp_path)], "not a usable sparseland results store")
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / STORE_NAME)], "not a directory")


@pytest.fixture
def fake_cli(monkeypatch):
    for name, runner in ff.runners().items():
        monkeypatch.setitem(frontier.RUNNERS, name, runner)
    monkeypatch.setattr(frontier, "load_workload", ff.workload)
    monkeypatch.setattr(frontier, "default_speed_fn", lambda n_tokens=32: ff.speed)


def test_frontier_then_report(capsys, tmp_path, fake_cli):
    args = ["--out", str(tmp_path), "--seq-len", "32", "--eval-windows", "2", "--calib-windows", "2"]
    args += ["--longctx-length", "0"]  # the fakes' workload has no tokenizer
    assert main(["frontier", "--methods", "fakewanda", "--sparsities", "0.5,70%", "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "fakewanda" in out and "report:" in out and (tmp_path / "report.html").is_file()
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert "fakewanda" in capsys.readouterr().out and (tmp_path / "report.html").is_file()


@pytest.mark.skipif(importlib.util.find_spec("sparseland.weights") is None, reason="no sparseland.weights")
def test_real_weight_runners_on_tiny_llama(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "load_workload", ff.workload)
    cells = frontier.build_grid(["wanda", "sparsegpt"], [0.5], ["unstructured", "2:4"])
    settings = frontier.FrontierSettings(model="tiny", seq_len=32, eval_windows=2, calib_windows=4)
    results = frontier.run_frontier(cells, settings, tmp_path, progress=False)
    assert len(results) == 9
    for r in results:
        expected = 0.0 if r["cell"]["method"] == "dense" else 0.5
        assert abs(r["measured_sparsity"] - expected) < 0.01, r["label"]
        assert r["perplexity"] > 1
