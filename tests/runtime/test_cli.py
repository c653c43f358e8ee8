import json

from sparseland.cli import main
from sparseland.runtime.checkpoint import save_sparse_checkpoint
from tests.models.test_loader import _word_tokenizer
from tests.runtime.helpers import magnitude_prune_


def _checkpoint(tmp_path, tiny_llama):
    magnitude_prune_(tiny_llama, 0.5)
    return save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "ck", metadata={"sparsity": 0.5})


def test_generate_command(tmp_path, tiny_llama, capsys):
    ck = _checkpoint(tmp_path, tiny_llama)
    args = ["generate", "--model", str(ck), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main([*args, "--sparse-runtime"]) == 0
    sparse = json.loads(capsys.readouterr().out)
    assert sparse["text"] == dense["text"] and sparse["formats"] == {"bitmask": 14}
    from sparseland.runtime import fastpath

    want = "fused" if fastpath.available() else "python"  # which decode step ran, and why not fused
    assert sparse["path"] == dense["path"] == want
    assert (sparse["path_reason"] is None) == (want == "fused")


def test_bench_command(tmp_path, tiny_llama, capsys):
    ck = _checkpoint(tmp_path, tiny_llama)
    args = ["bench", "--model", str(ck), "--skip-kernels", "--new-tokens", "3", "--rounds", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in out["decode"]] == ["dense", "dense_bf16", "model"]
    assert all(r["path"] in ("fused", "python") and "path_reason" in r for r in out["decode"])
    assert out["decode"][2]["model_bytes"] < out["decode"][0]["model_bytes"]
    assert out["checkpoint_mb"] > 0
    assert main(["bench", "--model", str(ck), "--skip-kernels", "--new-tokens", "2", "--rounds", "1"]) == 0
    assert "decode tok/s" in capsys.readouterr().out


def test_bench_dense_model_needs_prune_flag(tmp_path, tiny_llama, capsys):
    ck = save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "dense", metadata={})
    assert main(["bench", "--model", str(ck), "--skip-kernels"]) == 2
    assert "--prune-sparsity" in capsys.readouterr().err
    args = [
        "bench",
        "--model",
        str(ck),
        "--skip-kernels",
        "--prune-sparsity",
        "0.5",
        "--pattern",
        "2:4",
        "--json",
    ]
    assert main([*args, "--new-tokens", "2", "--rounds", "1"]) == 0
