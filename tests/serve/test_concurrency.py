"""Queueing, fairness, disconnects and prompt caching against live servers (``step_delay`` slows each
decode turn so that streams last long enough to act on them mid-way)."""

from __future__ import annotations

import threading
import time

import httpx
import torch

from sparseland.runtime.generate import greedy_generate
from sparseland.serve.engine import PromptCache
from tests.serve.conftest import MODEL_ID


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _body(max_tokens: int, **kw) -> dict:
    body = {"model": MODEL_ID, "prompt": "w10 w20 w30", "max_tokens": max_tokens, "temperature": 0, **kw}
    return {**body, "ignore_eos": True}  # every answer max_tokens long


def test_a_disconnect_mid_stream_frees_the_slot(start_server):
    run = start_server(max_active=1, step_delay=0.1)  # 200 tokens would take 20 s
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", run.url + "/v1/completions", json=_body(200, stream=True)) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # a few events, then hang up
        assert any(line.startswith("data: ") for line in got)
        assert _wait_for(lambda: run.metric("sparseland_requests_cancelled_total") == 1, timeout=5)
        assert run.metric("sparseland_active_requests") == 0
        t0 = time.monotonic()
        r = http.post(run.url + "/v1/completions", json=_body(3))  # the one slot is free again
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert time.monotonic() - t0 < 15  # not behind the abandoned 20-second stream


def test_a_full_queue_answers_503_and_recovers(start_server):
    run = start_server(max_active=1, max_queue=1, step_delay=0.1)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", run.url + "/v1/completions", json=_body(100, stream=True)) as a:
            a_lines = a.iter_lines()  # kept: a dropped iterator closes the response
            next(a_lines)
            assert _wait_for(lambda: run.metric("sparseland_active_requests") == 1)
            with http.stream("POST", run.url + "/v1/completions", json=_body(100, stream=True)) as b:
                assert _wait_for(lambda: run.metric("sparseland_queue_depth") == 1)
                c = http.post(run.url + "/v1/completions", json=_body(3))
                assert c.status_code == 503 and c.headers["retry-after"] == "1"
                assert c.json()["error"]["type"] == "server_overloaded"
                assert b.status_code == 200
        assert run.metric("sparseland_requests_rejected_total") == 1
        assert _wait_for(lambda: run.metric("sparseland_active_requests") == 0)
        assert run.metric("sparseland_queue_depth") == 0
        assert http.post(run.url + "/v1/completions", json=_body(3)).status_code == 200


def test_a_short_request_is_not_held_behind_a_long_one(start_server):
    run = start_server(max_active=2, step_delay=0.02)
    seen: list[str] = []
    done = threading.Event()

    def long_stream():
        with httpx.stream("POST", run.url + "/v1/completions", json=_body(150, stream=True), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    seen.append(line)
        done.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert _wait_for(lambda: len(seen) >= 2)
    short = httpx.post(run.url + "/v1/completions", json=_body(4), timeout=60)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
    assert not done.is_set()  # the short answer came back while the long one was still streaming
    t.join(timeout=60)
    assert done.is_set()


def test_a_continued_conversation_reuses_the_prefix_kv(server):
    c = server.client()
    first = c.completions.create(
        model=MODEL_ID, prompt="w60 w61 w62 w63 w64 w65", max_tokens=8, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    prompt1 = server.tokenizer("w60 w61 w62 w63 w64 w65")["input_ids"]
    answer = first.choices[0].model_extra["token_ids"]
    follow = prompt1 + answer + [70, 71, 72]
    r = c.completions.create(
        model=MODEL_ID, prompt=follow, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    # the cache held the prompt and every answer token but the last (never fed back)
    assert r.usage.prompt_tokens_details.cached_tokens == len(prompt1) + len(answer) - 1
    assert r.choices[0].model_extra["token_ids"] == greedy_generate(server.model, torch.tensor([follow]), 12).tokens
    assert server.metric("sparseland_prompt_cache_hits_total") >= 1


def test_prompt_cache_keeps_under_its_memory_cap():
    def kv(n):
        return torch.zeros(2, 1, n, 4), torch.zeros(2, 1, n, 4)  # 2 * 2*1*n*4 * 4 bytes = 64 n

    cache = PromptCache(max_bytes=64 * 25)
    cache.put([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], *kv(10))
    cache.put([1, 2, 3, 9], *kv(4))
    assert cache.longest_prefix([1, 2, 3, 4, 5, 0])[0] == 5  # touches the 10-token entry
    cache.put([5] * 12, *kv(12))  # over the cap: the least recently used ([1, 2, 3, 9]) goes
    assert cache.bytes <= cache.max_bytes and cache.bytes == 64 * 22
    assert set(cache.entries) == {tuple(range(1, 11)), (5,) * 12}
    cache.put([7] * 30, *kv(30))  # larger than the whole cap: not stored
    assert cache.bytes == 64 * 22 and cache.longest_prefix([8, 8])[0] == 0


def test_a_non_streaming_client_that_gives_up_frees_the_slot(start_server):
    import pytest

    run = start_server(max_active=1, step_delay=0.1)  # 200 tokens would take 20 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(run.url + "/v1/completions", json=_body(200), timeout=1.0)
    assert _wait_for(lambda: run.metric("sparseland_requests_cancelled_total") == 1, timeout=8)
    assert _wait_for(lambda: run.metric("sparseland_active_requests") == 0, timeout=2)
