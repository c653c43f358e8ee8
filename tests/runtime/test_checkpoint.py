import json

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.models import load_model
from sparseland.runtime.checkpoint import checkpoint_bytes, load_sparse_checkpoint, save_sparse_checkpoint
from tests.models.test_loader import _word_tokenizer
from tests.runtime.helpers import magnitude_prune_


def _assert_same(m1, m2):
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2
        assert p1.dtype == p2.dtype and torch.equal(p1.view(torch.uint8), p2.view(torch.uint8)), n1


@pytest.mark.parametrize("pattern,fmt", [(None, "bitmask"), ("2:4", "nm")])
def test_round_trip_bit_exact(tmp_path, tiny_llama, pattern, fmt):
    magnitude_prune_(tiny_llama, 0.5, pattern)
    tiny_llama.model.layers[0].mlp.up_proj.weight.data[0, 1] = -0.0  # -0.0 is not a zero to drop
    out = save_sparse_checkpoint(tiny_llama, _word_tokenizer(), tmp_path / "ck", metadata={"sparsity": 0.5})
    manifest = json.loads((out / "sparseland.json").read_text())
    assert manifest["metadata"] == {"sparsity": 0.5}
    assert manifest["tensors"]["model.layers.0.mlp.gate_proj.weight"]["format"] == fmt
    model, tok = load_model(out)  # routed through load_sparse_checkpoint
    _assert_same(tiny_llama, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok("w1 w2")["input_ids"] == [4, 5]
    w = model.model.layers[1].self_attn.q_proj.weight
    assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    x = torch.randint(0, 256, (1, 7))
    assert torch.equal(tiny_llama(x).logits, model(x).logits)


def test_file_is_smaller(tmp_path):
    from tests.conftest import make_tiny_llama

    dense = make_tiny_llama(hidden=128, intermediate=512, vocab=64)
    d1 = save_sparse_checkpoint(dense, None, tmp_path / "dense", metadata={})
    magnitude_prune_(dense, 0.5)
    d2 = save_sparse_checkpoint(dense, None, tmp_path / "sparse", metadata={})
    ratio = checkpoint_bytes(d2) / checkpoint_bytes(d1)
    assert ratio < 0.6, ratio
    model, tok = load_sparse_checkpoint(d2)
    assert tok is None
    _assert_same(dense, model)


def test_bfloat16_and_odd_shapes(tmp_path):
    from tests.conftest import make_tiny_llama

    m = make_tiny_llama(hidden=36, intermediate=70, heads=3, kv_heads=1).to(torch.bfloat16)
    magnitude_prune_(m, 0.7)
    out = save_sparse_checkpoint(m, None, tmp_path / "ck", metadata={})
    model, _ = load_sparse_checkpoint(out, dtype=torch.bfloat16)
    _assert_same(m, model)


def test_existing_output_and_bad_manifest(tmp_path, tiny_llama):
    (tmp_path / "ck").mkdir()
    with pytest.raises(SparselandError, match="already exists"):
        save_sparse_checkpoint(tiny_llama, None, tmp_path / "ck", metadata={})
    (tmp_path / "ck" / "sparseland.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(SparselandError, match="not a sparseland"):
        load_sparse_checkpoint(tmp_path / "ck")
    assert not list(tmp_path.glob("*.tmp-*"))
