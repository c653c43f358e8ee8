"""The HTTP layer: a FastAPI app with OpenAI's routes over an ``Engine``.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(malformed JSON, wrong types, values out of range, an unknown model, a prompt longer than the
context), 404/405 for a wrong route or method, 503 when the queue is full. A request never reaches
the model before it is fully validated, so bad input cannot stop the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparseland.serve.engine import Engine, Event, GenRequest, QueueFull
from sparseland.serve.protocol import ChatRequest, CompletionRequest

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    where = ".".join(loc) if loc else "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg', 'invalid value')}{more}", where


class _CountResponses:
    """ASGI middleware counting responses by route and status for ``/metrics`` (pure ASGI, so that
    streaming and disconnects pass through untouched)."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.responses[(path, int(message["status"]))] += 1
            await send(message)

        return await self.app(scope, receive, counting_send)


class _Service:
    """What the routes share: the engine, the served model's name and card, and the request handling
    (validation, generation, the JSON answer or its server-sent-events stream)."""

    def __init__(self, engine: Engine, model_id: str, info: dict[str, Any] | None) -> None:
        self.engine, self.model_id, self.info = engine, model_id, info
        self.tok = engine.tokenizer
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(
                400, f"model {name!r} is not served here; this server serves {self.model_id!r}", param="model",
                code="model_not_found",
            )  # fmt: skip

    def check_length(self, n_prompt: int, max_tokens: int | None) -> int:
        if n_prompt == 0:
            raise APIError(400, "the prompt gives no tokens; send some text", param="prompt")
        context = self.engine.context
        room = context - n_prompt
        if room < 1:
            raise APIError(
                400, f"the prompt has {n_prompt} tokens; the context holds {context}: shorten it",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(
                400, f"max_tokens={max_tokens} with a {n_prompt}-token prompt exceeds the context of "
                f"{context} tokens; ask for at most {room}", param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return max_tokens

    async def completion_ids(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            ids = list(p)
            if max(ids) >= len(self.tok):
                raise APIError(
                    400, f"prompt token id {max(ids)} is outside the vocabulary of {len(self.tok)}", param="prompt"
                )
            return ids
        return await run_in_threadpool(self.engine.encode, p if isinstance(p, str) else p[0])

    async def chat_ids(self, body: ChatRequest) -> list[int]:
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            raise APIError(
                400, f"{self.model_id} has no chat template; use /v1/completions with a prompt", param="messages"
            )
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject an order of roles
            raise APIError(400, f"the chat template rejects these messages: {exc}", param="messages") from None
        return await run_in_threadpool(self.engine.encode, text, False)

    async def run(self, request: Request, body, ids: list[int], max_tokens: int, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = GenRequest(
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stops,
            ignore_eos=body.ignore_eos,
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        try:
            self.engine.submit(req)
        except QueueFull as exc:
            return error_response(503, f"the server is busy: {exc}; retry later", "server_overloaded",
                                  headers={"Retry-After": "1"})  # fmt: skip
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return StreamingResponse(
                self.stream(req, events, rid, chat, body), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        try:
            ev = await self._finish(request, events)
        finally:
            req.cancel()  # no-op when finished; frees the slot when the client left
        if ev is None:
            return PlainTextResponse("", status_code=499)
        if ev.finish_reason == "error":
            return error_response(500, f"generation failed: {ev.error}", "server_error")
        return self.answer(req, ev, rid, chat, body)

    @staticmethod
    async def _finish(request: Request, events: asyncio.Queue) -> Event | None:
        """The request's final event, or None when the client disconnected first (checked twice a second)."""
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                ev = None
            if ev is not None and ev.finish_reason is not None:
                return ev
            if time.monotonic() - checked >= 0.5:  # the client may have given up: free the slot
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None

    def answer(self, req: GenRequest, ev: Event, rid: str, chat: bool, body) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": req.text}
        else:
            choice["text"] = req.text
        if body.return_token_ids:
            choice["token_ids"] = list(req.tokens)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
            "usage": self.usage(req),
        }

    @staticmethod
    def usage(req: GenRequest) -> dict[str, Any]:
        n, m = len(req.prompt_ids), len(req.tokens)
        details = {"cached_tokens": req.cached_tokens}
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m, "prompt_tokens_details": details}

    def _chunk(self, rid: str, kind: str, now: int, chat: bool, delta, finish, extra: dict | None = None) -> str:
        if chat:
            d = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None, **(extra or {})}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None, **(extra or {})}
        obj = {"id": rid, "object": kind, "created": now, "model": self.model_id, "choices": [choice]}
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(self, req: GenRequest, events: asyncio.Queue, rid: str, chat: bool, body):
        now = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": kind, "created": now, "model": self.model_id}
        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [first]})}\n\n"
            while True:
                ev: Event = await events.get()
                if ev.finish_reason == "error":
                    err = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if ev.delta:
                    yield self._chunk(rid, kind, now, chat, ev.delta, None)
                if ev.finish_reason is not None:
                    extra = {"token_ids": list(req.tokens)} if body.return_token_ids else None
                    yield self._chunk(rid, kind, now, chat, None if chat else "", ev.finish_reason, extra)
                    break
            if body.stream_options is not None and body.stream_options.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(req)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the client went away (or the answer is complete): free the slot at once


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: say so, without a traceback
        return error_response(500, f"internal error ({type(exc).__name__})", "server_error")


def _add_status_routes(app: FastAPI, svc: _Service) -> None:
    engine, model_id = svc.engine, svc.model_id

    @app.get("/health")
    async def health():
        if not engine.healthy():
            return error_response(503, f"the engine stopped: {engine.error}", "server_error")
        waiting, active = engine.depth()
        return {"status": "ok", "model": model_id, "waiting": waiting, "active": active}

    @app.get("/metrics")
    async def metrics():
        waiting, active = engine.depth()
        text = engine.metrics.render(waiting, active, model_id.replace("\\", "\\\\").replace('"', '\\"'))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": svc.created, "owned_by": "sparseland"}
        return {"object": "list", "data": [{**card, "sparseland": svc.info or {}}]}


def _add_generation_routes(app: FastAPI, svc: _Service) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        svc.check_model(body.model)
        ids = await svc.completion_ids(body)
        max_tokens = svc.check_length(len(ids), body.max_tokens)
        return await svc.run(request, body, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        svc.check_model(body.model)
        ids = await svc.chat_ids(body)
        max_tokens = svc.check_length(len(ids), body.max_tokens)
        return await svc.run(request, body, ids, max_tokens, chat=True)


def build_app(engine: Engine, model_id: str, info: dict[str, Any] | None = None) -> FastAPI:
    """The app serving ``engine``'s model under the name ``model_id``; ``info`` is shown in /v1/models."""
    app = FastAPI(title="sparseland serve", docs_url=None, redoc_url=None, openapi_url=None)
    svc = _Service(engine, model_id, info)
    _add_error_handlers(app)
    _add_status_routes(app, svc)
    _add_generation_routes(app, svc)
    app.add_middleware(_CountResponses, metrics=engine.metrics)
    return app
