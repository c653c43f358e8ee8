"""evaluate_longctx and ``sparseland longctx`` on a tiny random Llama with the stub tokenizer (seconds);
the real model only in the ``slow`` test."""

from __future__ import annotations

import json

import pytest

from sparseland.cli import main
from sparseland.data.longctx import generate_samples
from sparseland.errors import SparselandError
from sparseland.evaluate.longctx import LongCtxResult, SampleResult, evaluate_longctx, format_table
from tests.conftest import make_tiny_llama
from tests.data.test_longctx import StubTokenizer


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(max_pos=1024), StubTokenizer(vocab=256)


def test_end_to_end_on_tiny_model_and_backends_agree(tiny):
    model, tok = tiny
    samples = generate_samples(tok, [512], tasks=["niah_single", "vt"], n_samples=2, seed=0)
    lean = evaluate_longctx(model, tok, samples, max_new_tokens=4, progress=False, backend="lean")
    hf = evaluate_longctx(model, tok, samples, max_new_tokens=4, progress=False, backend="hf")
    assert [s.output for s in lean.samples] == [s.output for s in hf.samples]  # both are greedy decoding
    cells = lean.cells()
    assert [(c["task"], c["length"], c["n"]) for c in cells] == [("niah_single", 512, 2), ("vt", 512, 2)]
    for c in cells:
        assert 0.0 <= c["accuracy"] <= 100.0 and c["prompt_tokens"] <= 512
    assert json.loads(json.dumps(lean.to_dict()))["label"] == "dense"


def _result(scores: list[tuple[str, int, str, list[str]]]) -> LongCtxResult:
    from sparseland.data.longctx import score_all, score_part

    r = LongCtxResult(label="x", backend="lean")
    for i, (task, length, out, answers) in enumerate(scores):
        r.samples.append(
            SampleResult(
                task,
                length,
                0.5,
                i,
                length - 10,
                answers,
                out,
                score_all(out, answers),
                score_part(out, answers),
                0.1,
                0.2,
            )
        )
    return r


def test_cell_accuracy_from_hand_made_outputs():
    r = _result(
        [
            ("niah_single", 1024, "is: 1234567.", ["1234567"]),  # exact: 1
            ("niah_single", 1024, "is: 7654321.", ["1234567"]),  # none: 0
            ("niah_multivalue", 1024, "1111111, 2222222", ["1111111", "2222222", "3333333", "4444444"]),  # 0.5
            ("niah_single", 2048, "1234567", ["1234567"]),
        ]
    )
    by = {(c["task"], c["length"]): c for c in r.cells()}
    assert by[("niah_single", 1024)]["accuracy"] == 50.0 and by[("niah_single", 1024)]["n"] == 2
    assert by[("niah_multivalue", 1024)]["accuracy"] == 50.0
    assert by[("niah_multivalue", 1024)]["accuracy_part"] == 100.0
    assert r.accuracy(length=2048) == 100.0
    assert r.accuracy(length=1024) == pytest.approx(100.0 * (1 + 0 + 0.5) / 3)
    table = format_table([r])
    assert "niah_single" in table and "50.0" in table and "100.0" in table


def test_sample_longer_than_model_context_is_rejected(tiny):
    _, tok = tiny
    small = make_tiny_llama(max_pos=256)
    samples = generate_samples(tok, [512], tasks=["niah_single"], n_samples=1)
    with pytest.raises(SparselandError, match="context of 256"):
        evaluate_longctx(small, tok, samples, progress=False)
    with pytest.raises(SparselandError, match="backend"):
        evaluate_longctx(small, tok, samples, progress=False, backend="vllm")


def _one_error_line(capsys, argv: list[str], expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparseland: error:") and expect in err[0], err


def test_cli_bad_input_gives_one_clear_line(capsys, monkeypatch, tiny):
    _one_error_line(capsys, ["longctx", "--tasks", "niah_single,haystack"], "unknown task")
    _one_error_line(capsys, ["longctx", "--method", "nope", "--sparsity", "0.5"], "unknown method 'nope'")
    import sparseland.models

    monkeypatch.setattr(sparseland.models, "load_model", lambda name: tiny)
    _one_error_line(capsys, ["longctx", "--length", "4096"], "longer than the model's context of 1024")


def test_cli_runs_dense_on_tiny_model(capsys, monkeypatch, tiny, tmp_path):
    import sparseland.models

    monkeypatch.setattr(sparseland.models, "load_model", lambda name: tiny)
    out = tmp_path / "r.json"
    argv = ["longctx", "--length", "512", "--tasks", "niah_single", "cwe", "--samples", "1", "--max-new-tokens", "3"]
    assert main([*argv, "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert [c["task"] for c in printed["results"][0]["cells"]] == ["niah_single", "cwe"]
    assert main(argv) == 0
    assert "niah_single" in capsys.readouterr().out


@pytest.mark.slow
def test_dense_model_finds_a_needle_at_1k(embedded):
    model, tok = embedded
    samples = generate_samples(tok, [1024], tasks=["niah_single"], n_samples=2)
    res = evaluate_longctx(model, tok, samples, progress=False)
    assert res.accuracy() > 0.0, [s.output for s in res.samples]


def test_cli_sparse_method_beside_dense_on_same_samples(capsys, monkeypatch, tiny):
    import sparseland.attention
    import sparseland.models

    if "streaming" not in getattr(sparseland.attention, "METHODS", ()):
        pytest.skip("sparse attention methods are not available")
    monkeypatch.setattr(sparseland.models, "load_model", lambda name: tiny)
    argv = ["longctx", "--length", "512", "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "streaming", "--sparsity", "0.5", "--compare-dense", "--json"]) == 0
    dense, sparse = json.loads(capsys.readouterr().out)["results"]
    assert dense["label"] == "dense" and sparse["info"]["method"] == "streaming"
    assert [s["prompt_tokens"] for s in dense["samples"]] == [s["prompt_tokens"] for s in sparse["samples"]]
    assert 0.0 < sparse["info"]["measured_prefill_sparsity"] < 1.0
    _one_error_line(capsys, [*argv, "--method", "streaming"], "needs --sparsity")


def test_cli_method_with_config_fields(capsys, monkeypatch, tiny):
    import sparseland.models

    monkeypatch.setattr(sparseland.models, "load_model", lambda name: tiny)
    argv = ["longctx", "--length", "512", "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "quest:page_size=4,refine=4,dense_layers=0", "--sparsity", "0.9", "--json"]) == 0
    (res,) = json.loads(capsys.readouterr().out)["results"]
    assert res["info"]["method"] == "quest" and res["info"]["fields"] == {
        "page_size": 4,
        "refine": 4,
        "dense_layers": 0,
    }
    assert 0.0 < res["info"]["measured_decode_sparsity"] < 1.0
    _one_error_line(capsys, [*argv, "--method", "quest:bogus=1", "--sparsity", "0.9"], "bogus")
    _one_error_line(capsys, [*argv, "--method", "quest:refine", "--sparsity", "0.9"], "KEY=VALUE")
    _one_error_line(capsys, [*argv, "--method", "quest:refine=0", "--sparsity", "0.9"], "refine=0")
