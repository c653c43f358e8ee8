"""Many concurrent streaming clients: every stream completes, none is lost, and each greedy answer is
the one ``greedy_generate`` gives its prompt alone (interleaving requests on the worker changes nothing)."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch

from sparseland.runtime.generate import greedy_generate
from tests.serve.conftest import MODEL_ID


async def _stream(http: httpx.AsyncClient, url: str, ids: list[int], n: int) -> tuple[list[int] | None, int]:
    body = {"model": MODEL_ID, "prompt": ids, "max_tokens": n, "temperature": 0, "stream": True}
    body |= {"return_token_ids": True, "stream_options": {"include_usage": True}}
    token_ids, usage, done = None, 0, False
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                obj = json.loads(line[6:])
                for ch in obj["choices"]:
                    token_ids = ch.get("token_ids", token_ids)
                usage = (obj.get("usage") or {}).get("completion_tokens", usage)
    return (token_ids if done else None), usage


def _batched_calls(run) -> float:
    for line in httpx.get(run.url + "/metrics").text.splitlines():
        if line.startswith("sparseland_engine_calls_total{") and 'part="batched_decode"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(("batch", "batch_min"), [(True, 2), (False, 2), (True, 99)])
def test_concurrent_streams_all_complete_and_stay_exact(start_server, batch, batch_min):
    """With continuous batching the decoding requests share steps (the tiny model's greedy tokens come
    out the same as alone: no near-ties on these prompts); without it, or with fewer decoding requests
    than batch_min, each takes its own fused step."""
    run = start_server(max_active=3, max_queue=16, batch=batch, batch_min=batch_min)
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 256) for _ in range(rng.randint(3, 40))] for _ in range(24)]
    lengths = [rng.randint(1, 30) for _ in prompts]

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            sem = asyncio.Semaphore(6)  # six clients at a time, 24 requests

            async def one(ids, n):
                async with sem:
                    return await _stream(http, run.url, ids, n)

            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))

    results = asyncio.run(main())
    for ids, n, (got, usage) in zip(prompts, lengths, results, strict=True):
        want = greedy_generate(run.model, torch.tensor([ids]), n).tokens
        assert got == want and usage == len(want)
    assert run.metric("sparseland_requests_finished_total") == len(prompts)
    assert run.metric("sparseland_requests_cancelled_total") == 0
    assert run.metric("sparseland_active_requests") == 0 and run.metric("sparseland_queue_depth") == 0
    assert (_batched_calls(run) > 0) == (batch and batch_min <= 3)
