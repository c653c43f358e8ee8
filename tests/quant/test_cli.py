"""`sparseland quantize` and `sparseland prune --quant` end to end on a tiny checkpoint."""

import json

from sparseland.cli import main
from sparseland.quant import quant_state
from sparseland.runtime.checkpoint import load_sparse_checkpoint, save_sparse_checkpoint
from tests.models.test_loader import _word_tokenizer


def _dense_checkpoint(tmp_path, tiny_llama):
    return save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "dense", metadata={})


def test_quantize_writes_a_quantized_checkpoint(tmp_path, tiny_llama, capsys):
    ck = _dense_checkpoint(tmp_path, tiny_llama)
    out = tmp_path / "q4"
    args = ["quantize", "--model", str(ck), "--scheme", "int4-g32-sym", "--embeddings", "int8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "int4-g32-sym" in printed and "4.500 bits per weight" in printed
    model, _ = load_sparse_checkpoint(out)
    assert quant_state(model.model.layers[1].mlp.up_proj).scheme.name == "int4-g32-sym"
    assert quant_state(model.model.embed_tokens).scheme.name == "int8"
    meta = json.loads((out / "sparseland.json").read_text())["metadata"]
    assert meta["method"]["kind"] == "quant" and meta["report"]["layers"] == 14


def test_prune_with_quant_keeps_the_mask(tmp_path, tiny_llama):
    ck = _dense_checkpoint(tmp_path, tiny_llama)
    out = tmp_path / "pq"
    args = ["prune", "--model", str(ck), "--method", "magnitude", "--sparsity", "0.5", "--quant", "int4-g32"]
    assert main([*args, "--seq-len", "16", "--out", str(out)]) == 0
    model, _ = load_sparse_checkpoint(out)
    qw = quant_state(model.model.layers[0].self_attn.q_proj)
    assert qw.mask is not None and abs(float(qw.mask.float().mean()) - 0.5) < 0.02


def test_quantize_bad_scheme_is_one_line(tmp_path, capsys):
    code = main(["quantize", "--model", "bogus", "--scheme", "int5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "int5" in err and len(err.strip().splitlines()) == 1
