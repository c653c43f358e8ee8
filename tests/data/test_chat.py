import pytest
import torch

from sparseland.data.chat import (
    Conversation,
    chat_ids,
    chat_tokens,
    format_chat,
    generate_answers,
    instructions,
    mix_calibration,
    self_chat,
)
from sparseland.errors import SparselandError
from sparseland.runtime.generate import greedy_generate
from tests.conftest import make_tiny_llama
from tests.models.test_loader import _word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def chat_tokenizer():
    tok = _word_tokenizer()
    tok.add_tokens(["system", "user", "assistant"])
    tok.chat_template = TEMPLATE
    return tok


def test_instruction_splits_are_disjoint_and_fixed():
    calib, ev = instructions("calib"), instructions("eval")
    assert len(calib) >= 60 and len(ev) >= 30
    assert not set(calib) & set(ev) and len(set(calib)) == len(calib)
    assert instructions("calib") == calib
    with pytest.raises(SparselandError, match="unknown chat split"):
        instructions("train")


def test_format_chat_uses_the_template():
    tok = chat_tokenizer()
    assert format_chat(tok, "w1 w2") == "<s> user w1 w2 </s> <s> assistant "
    assert (
        format_chat(tok, "w1", system="w9", answer="w3") == "<s> system w9 </s> <s> user w1 </s> <s> assistant w3 </s> "
    )
    with pytest.raises(SparselandError, match="no chat template"):
        format_chat(_word_tokenizer(), "w1")


def test_batched_answers_equal_one_at_a_time_greedy(tmp_path):
    model, tok = make_tiny_llama(vocab=128), chat_tokenizer()
    prompts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10"]  # different lengths: left padding must not matter
    convs = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    for p, c in zip(prompts, convs, strict=True):
        res = greedy_generate(model, chat_ids(tok, p), 6)
        assert c.prompt == p and c.answer == tok.decode(res.tokens, skip_special_tokens=True).strip()


def test_self_chat_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELAND_CACHE", str(tmp_path))
    model, tok = make_tiny_llama(vocab=128), chat_tokenizer()
    first = self_chat(model, tok, "eval", max_new_tokens=3, limit=2, progress=False)
    files = list((tmp_path / "chat").glob("*.json"))
    assert len(files) == 1 and len(first) == 2
    calls = []
    monkeypatch.setattr("sparseland.data.chat.generate_answers", lambda *a, **k: calls.append(1) or first)
    assert self_chat(model, tok, "eval", max_new_tokens=3, limit=2, progress=False) == first and not calls
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # other weights: a cache miss, so the model is asked again
    self_chat(model, tok, "eval", max_new_tokens=3, limit=2, progress=False)
    assert calls == [1] and len(list((tmp_path / "chat").glob("*.json"))) == 2


def test_chat_tokens_concatenates_formatted_conversations():
    tok = chat_tokenizer()
    convs = [Conversation("w1", "w2 w3"), Conversation("w4", "w5")]
    ids = chat_tokens(tok, convs)
    one = tok(format_chat(tok, "w1", answer="w2 w3"), add_special_tokens=False)["input_ids"]
    assert ids[: len(one)].tolist() == one and len(ids) > len(one)
    with pytest.raises(SparselandError, match="no conversations"):
        chat_tokens(tok, [])


def test_mix_calibration_shares():
    a, b = torch.arange(0, 100), torch.arange(1000, 1100)
    w = mix_calibration([(a, 1.0), (b, 1.0)], 8, 10, seed=0)
    assert w.shape == (8, 10)
    assert int((w[:, 0] < 1000).sum()) == 4
    w = mix_calibration([(a, 3.0), (b, 1.0)], 8, 10, seed=0)
    assert int((w[:, 0] < 1000).sum()) == 6
    streams = [(torch.arange(k * 1000, k * 1000 + 50), s) for k, s in enumerate([0.3, 0.3, 0.3, 0.1])]
    w = mix_calibration(streams, 5, 10)
    assert w.shape == (5, 10)  # largest remainders: 2, 1, 1, 1 or similar, never a negative count
    assert torch.equal(mix_calibration([(a, 1.0)], 4, 10, seed=3), mix_calibration([(a, 1.0)], 4, 10, seed=3))
    with pytest.raises(SparselandError, match="positive share"):
        mix_calibration([(a, 0.0)], 4, 10)
