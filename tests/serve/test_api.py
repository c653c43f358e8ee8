"""The OpenAI API through the official ``openai`` client against a live server on the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from sparseland.runtime.generate import greedy_generate
from tests.serve.conftest import MODEL_ID

PROMPT = "w10 w11 w12 w13 w14 w15 w16"


def _greedy(run, ids: list[int], n: int) -> list[int]:
    return greedy_generate(run.model, torch.tensor([ids]), n).tokens


def test_models_lists_the_model_and_what_runs(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    info = models[0].model_extra["sparseland"]
    assert info["sparse_runtime"] and "bitmask" in info["runtime_formats"]


def test_completion_greedy_equals_greedy_generate(server):
    ids = server.tokenizer(PROMPT)["input_ids"]
    want = _greedy(server, ids, 24)
    r = server.client().completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want
    eos = server.tokenizer.eos_token_id
    assert choice.text == server.tokenizer.decode([t for t in want if t != eos], skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if want[-1] == eos else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.usage.total_tokens == len(ids) + len(want)


def test_token_id_prompt_and_streaming_equal_non_streaming(server):
    ids = server.tokenizer("w40 w41 w42")["input_ids"]
    want = _greedy(server, ids, 20)
    c = server.client()
    full = c.completions.create(model=MODEL_ID, prompt=ids, max_tokens=20, temperature=0)
    parts, finish = [], None
    stream = c.completions.create(
        model=MODEL_ID, prompt=ids, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
    )  # fmt: skip
    usage, token_ids = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
            token_ids = ch.model_extra.get("token_ids") or token_ids
    assert "".join(parts) == full.choices[0].text
    assert token_ids == want and finish == full.choices[0].finish_reason
    assert usage.completion_tokens == len(want) and usage.prompt_tokens == len(ids)


def test_chat_uses_the_template_and_streams(server):
    msgs = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 w32"}]
    text = server.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == 5  # the template ends with "assistant"
    want = _greedy(server, ids, 16)
    c = server.client()
    r = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0)
    eos = server.tokenizer.eos_token_id
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == server.tokenizer.decode([t for t in want if t != eos])
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_cut_the_answer(server):
    c = server.client()
    full = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 6, full
    stop = words[4]
    want = full[: full.find(stop)]
    r = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want  # the stop string's start was held back


def test_sampling_is_seeded(server):
    c = server.client()
    kw = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=1.5, top_p=0.95)
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b
    assert others - {a}  # different seeds draw different answers (random tiny model: near-uniform)
    # a tiny nucleus keeps only the most likely token: greedy
    greedy = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert c.completions.create(seed=3, **{**kw, "top_p": 1e-6}).choices[0].text == greedy


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "nope", "prompt": "w7"}, "model"),
        ({"model": MODEL_ID, "prompt": "w7", "max_tokens": "5"}, "max_tokens"),
        ({"model": MODEL_ID, "prompt": "w7", "temperature": -1}, "temperature"),
        ({"model": MODEL_ID, "prompt": "w7", "max_tokens": 10**30}, "max_tokens"),
        ({"model": MODEL_ID, "prompt": "w7 " * 300}, "messages"),  # longer than the 256-token context
        ({"model": MODEL_ID, "prompt": "w7", "max_tokens": 256}, "max_tokens"),  # 1 + 256 tokens > the context
        ({"model": MODEL_ID, "prompt": [9999]}, "prompt"),
        ({"model": MODEL_ID, "prompt": "w7", "n": 2}, "n"),
        ({"prompt": "w7"}, "model"),
    ],
)
def test_bad_requests_are_400_with_a_message(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param or param in err["message"]


def test_the_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="not served here"):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "w7"}])
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_health_and_metrics(server):
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    before = server.metric("sparseland_completion_tokens_total")
    server.client().completions.create(model=MODEL_ID, prompt="w50 w51", max_tokens=5, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE sparseland_time_to_first_token_seconds histogram" in text
    assert 'sparseland_http_responses_total{path="/v1/completions",code="200"}' in text
    assert server.metric("sparseland_completion_tokens_total") >= before + 1
    assert server.metric("sparseland_queue_depth") == 0
    assert server.metric("sparseland_time_to_first_token_seconds_count") >= 1
