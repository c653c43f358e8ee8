"""QuantConfig through sparsify_, prune + quantize, and quantized weights in checkpoints."""

import json

import pytest
import torch

import sparseland as sl
from sparseland.errors import SparselandError
from sparseland.quant import QuantConfig, quant_state
from sparseland.runtime.checkpoint import load_sparse_checkpoint, save_sparse_checkpoint
from tests.runtime.helpers import magnitude_prune_


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}


def test_rtn_quantizes_every_block_linear(tiny_llama):
    before = {n: m.weight.detach().clone() for n, m in _linears(tiny_llama).items()}
    report = sl.sparsify_(tiny_llama, QuantConfig(scheme="int4-g32"))
    assert report.layers == len(before) == 14 and report.sparse_layers == 0
    assert report.bits_per_weight == pytest.approx(5.0)
    for n, m in _linears(tiny_llama).items():
        qw = quant_state(m)
        assert qw is not None and torch.equal(m.weight, qw.dequantize())
        assert not torch.equal(m.weight, before[n])  # random float weights are not on the grid
    assert quant_state(tiny_llama.model.embed_tokens) is None


def test_changed_weight_is_no_longer_quantized(tiny_llama):
    sl.sparsify_(tiny_llama, QuantConfig(scheme="int8"))
    m = tiny_llama.model.layers[0].mlp.up_proj
    assert quant_state(m) is not None
    m.weight.data[0, 0] += 1.0
    assert quant_state(m) is None


def test_pruned_weights_keep_their_zeros_as_a_mask(tiny_llama):
    magnitude_prune_(tiny_llama, 0.5, None)
    report = sl.sparsify_(tiny_llama, QuantConfig(scheme="int4-g64"))
    assert report.sparse_layers == report.layers
    for m in _linears(tiny_llama).values():
        qw = quant_state(m)
        assert qw.mask is not None and float((m.weight == 0).float().mean()) >= 0.5
        assert torch.equal(qw.mask, m.weight != 0)
    assert report.bits_per_weight < 4.0  # 1 mask bit + half the codes + scales


def test_prune_then_quantize_with_the_pruning_config(tiny_llama):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    sl.sparsify_(tiny_llama, sl.WandaConfig(sparsity=0.5, pattern="2:4", quant="int4-g32-sym"), calibration=calib)
    m = tiny_llama.model.layers[1].self_attn.o_proj
    qw = quant_state(m)
    assert qw.scheme.name == "int4-g32-sym" and qw.mask is not None
    assert int(qw.mask.view(m.out_features, -1, 4).sum(-1).max()) <= 2


def test_bad_configs_say_how_to_fix():
    with pytest.raises(SparselandError, match="int4-g32"):
        QuantConfig(scheme="int5")
    with pytest.raises(SparselandError, match="method"):
        QuantConfig(method="awq")
    with pytest.raises(SparselandError, match="calibration"):
        from tests.conftest import make_tiny_llama

        sl.sparsify_(make_tiny_llama(), QuantConfig(method="gptq"))


def test_embeddings_and_tied_head(tiny_llama):
    sl.sparsify_(tiny_llama, QuantConfig(scheme="int4-g32", embeddings="int8"))
    emb = tiny_llama.model.embed_tokens
    assert quant_state(emb).scheme.name == "int8"
    assert tiny_llama.lm_head.weight is emb.weight


@pytest.mark.parametrize("prune", [False, True])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, tiny_llama, prune):
    if prune:
        magnitude_prune_(tiny_llama, 0.6, None)
    sl.sparsify_(tiny_llama, QuantConfig(scheme="int4-g32", embeddings="int8"))
    out = save_sparse_checkpoint(tiny_llama, None, tmp_path / "ck", metadata={})
    manifest = json.loads((out / "sparseland.json").read_text())
    rec = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert rec["format"] == "quant" and rec["scheme"] == "int4-g32" and rec["sparse"] is prune
    assert manifest["tensors"]["model.embed_tokens.weight"]["scheme"] == "int8"
    model, _ = load_sparse_checkpoint(out)
    for (n1, a), (n2, b) in zip(tiny_llama.state_dict().items(), model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b), n1
    for n, m in _linears(model).items():
        q1, q2 = quant_state(_linears(tiny_llama)[n]), quant_state(m)
        assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.scale, q2.scale)
    assert quant_state(model.model.embed_tokens) is not None


def test_damaged_quant_checkpoint_is_a_clear_error(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    sl.sparsify_(tiny_llama, QuantConfig(scheme="int4-g32"))
    out = save_sparse_checkpoint(tiny_llama, None, tmp_path / "ck", metadata={})
    store = load_file(str(out / "model.safetensors"))
    store["model.layers.0.mlp.up_proj.weight.codes"] = store["model.layers.0.mlp.up_proj.weight.codes"][:-3]
    save_file(store, str(out / "model.safetensors"))
    with pytest.raises(SparselandError, match="up_proj.weight.codes.*damaged"):
        load_sparse_checkpoint(out)


@pytest.mark.slow
def test_embedded_model_is_exactly_int4_g32(embedded):
    """SmolLM2's float weights are its dequantized Q4_1 file: int4-g32 round to nearest gives them back."""
    model, _ = embedded
    for name, m in list(_linears(model).items())[:14]:
        from sparseland.quant import quantize_rtn

        assert torch.equal(quantize_rtn(m.weight, "int4-g32").dequantize(), m.weight), name


@pytest.mark.slow
def test_embedded_token_embeddings_are_exactly_int8_g32(embedded):
    """The shipped file's token_embd is Q8_0: int8-g32 (the Q8_0 rule d = max|w| / 127 per 32) gives the
    float embeddings back bit for bit; int8 with one scale per row does not."""
    from sparseland.quant import quantize_rtn

    w = embedded[0].model.embed_tokens.weight
    assert torch.equal(quantize_rtn(w, "int8-g32").dequantize(), w)
    assert not torch.equal(quantize_rtn(w[:64], "int8").dequantize(), w[:64])
