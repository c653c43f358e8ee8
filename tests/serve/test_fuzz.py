"""1,000 malformed requests (a seeded generator: broken JSON, wrong types, huge and non-finite values,
bad messages, wrong routes and methods): never a 5xx, every error in OpenAI's shape, and the server
still healthy and answering correctly afterwards."""

from __future__ import annotations

import json
import random

import httpx

from tests.serve.conftest import MODEL_ID

JUNK = [None, True, -1, 0, 1.5, 10**40, -(10**40), 1e308, "", "x" * 5000, [], {}, [None], {"a": [1, {"b": None}]}]
ROUTES = ["/v1/completions", "/v1/chat/completions"]


def _valid(route: str) -> dict:
    if route == "/v1/completions":
        return {"model": MODEL_ID, "prompt": "w10 w11", "max_tokens": 2, "temperature": 0}
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "w10"}], "max_tokens": 2}


BAD_FIELDS = {
    "model": ["nope", 7, None, ["tiny"]],
    "prompt": [7, [], [-1], [10**12], [[1, 2]], ["a", "b"], {"text": "w1"}, "w1 " * 400],
    "messages": [[], "hi", [{"role": "robot", "content": "x"}], [{"content": "x"}], [{"role": "user"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}], [None]],
    "max_tokens": [0, -5, "10", 1.5, 10**30, True, 257, [3]],
    "temperature": [-0.1, 2.5, "hot", float("inf"), None, [1]],
    "top_p": [0, 1.5, -1, "all", float("nan")],
    "seed": ["s", 1.5, 2**70, -(2**70), [1]],
    "stop": [5, ["a"] * 5, [""], "", [None], "x" * 300],
    "stream": ["yes", 1, None, [True]],
    "n": [2, 0, "1"],
    "logprobs": [5, True],
    "stream_options": ["on", {"include_usage": "yes"}],
}  # fmt: skip


def malformed(rng: random.Random) -> tuple[str, str, bytes, dict]:
    """(method, route, body, headers) of one malformed request."""
    route = rng.choice(ROUTES)
    kind = rng.randrange(7)
    headers = {"content-type": "application/json"}
    if kind == 0:  # broken JSON: a valid body cut, with bytes flipped, or plain garbage
        raw = json.dumps(_valid(route)).encode()
        raw = raw[: rng.randrange(len(raw))] + bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
        return "POST", route, raw, headers
    if kind == 1:  # a JSON value that is not an object
        return "POST", route, json.dumps(rng.choice(JUNK)).encode(), headers
    if kind == 2:  # one field of the wrong type or out of range
        body = _valid(route)
        other = "messages" if "prompt" in body else "prompt"  # the other route's field would be ignored
        field = rng.choice([f for f in BAD_FIELDS if f != other])
        body[field] = rng.choice(BAD_FIELDS[field])
        return "POST", route, json.dumps(body).encode(), headers
    if kind == 3:  # required fields missing, junk added
        body = _valid(route)
        body.pop(rng.choice(list(body)[:2]))
        body[rng.choice(["junk", "x"])] = rng.choice(JUNK)
        return "POST", route, json.dumps(body).encode(), headers
    if kind == 4:  # several random fields set to random junk
        body = _valid(route)
        for f in rng.sample(list(BAD_FIELDS), 3):
            body[f] = rng.choice(JUNK)
        body["model"] = rng.choice([MODEL_ID, "other", 1])
        return "POST", route, json.dumps(body).encode(), headers
    if kind == 5:  # NaN / Infinity literals Python's json reader accepts, deep nesting
        raw = rng.choice([b'{"model": "%s", "prompt": "w1", "temperature": NaN}' % MODEL_ID.encode(),
                          b'{"model": "%s", "prompt": "w1", "top_p": Infinity}' % MODEL_ID.encode(),
                          b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000])  # fmt: skip
        return "POST", route, raw, headers
    # wrong method, route or content type
    return rng.choice([("GET", route, b"", {}), ("POST", "/v1/" + "x" * rng.randrange(1, 50), b"{}", headers),
                       ("POST", route, b"model=x", {"content-type": "application/x-www-form-urlencoded"}),
                       ("DELETE", "/v1/models", b"", {}), ("POST", "/health", b"{}", headers)])  # fmt: skip


def test_a_thousand_malformed_requests_never_500(server):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(1000):
            method, route, body, headers = malformed(rng)
            r = http.request(method, route, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, route, body[:300], r.text[:500])
            if r.status_code >= 400:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"], r.text
        print("statuses:", statuses)
        assert statuses.get(400, 0) > 700, statuses  # almost all are bad requests, answered as such
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json=_valid("/v1/completions") | {"max_tokens": 5})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert server.engine.healthy()
