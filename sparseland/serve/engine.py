"""The serving engine: one worker thread that owns the model and decodes the admitted requests.

Requests wait in a FIFO queue of bounded length (``max_queue``; a full queue is ``QueueFull``, the
HTTP layer's 503). Up to ``max_active`` requests are decoded at once, each with its own
``LeanDecoder``, in rounds: each request takes one turn per round (a prefill chunk or one token), so a
long answer cannot hold back a short one and a new request gets its first token after at most one
round of the others. A request whose client went away (``cancel()``) is dropped at its next turn and
its KV cache freed.

Continuous batching (``batch=True``; off by default): in each round, the requests past their prompt
take their next tokens together, in one ``batched_step`` (``runtime/batchstep.py``: every projection
reads its weights once for all of them; attention per request over its own cache) instead of one
fused step each, when at least ``batch_min`` are decoding (fewer take their fused steps). A request
that joins or finishes changes the next round's batch. Batched logits differ from a request's own
step by the several-row kernels' rounding, so a greedy answer can differ from ``greedy_generate``'s
(seen with int4 weights); ``batch=False`` takes one step per request (the fused C++ step where the
model is eligible) and its greedy tokens equal ``greedy_generate``'s.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparseland.runtime.batchstep import batch_reason, batched_step
from sparseland.runtime.generate import LeanDecoder, _eos_ids, sample_token
from sparseland.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass
class Event:
    """What the worker tells a request's caller: a text ``delta`` (may be empty), then one final
    event with ``finish_reason`` ("stop", "length"; "error" with ``error`` set)."""

    delta: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode max_tokens tokens whatever they are (load tests)
    emit: Callable[[Event], None] = lambda event: None
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the answer's text so far (stop strings cut off)
    sent: int = 0  # characters of ``text`` emitted
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache
    finish_reason: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoder: LeanDecoder | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.enqueued


class PromptCache:
    """Keys and values of finished sequences, keyed by their token ids, least recently used evicted
    first so that the total stays under ``max_bytes`` (0 turns caching off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self.bytes = 0

    def put(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a copy of k, v (L, KVH, len(ids), D) for ``ids``."""
        size = 2 * k.numel() * k.element_size()
        key = tuple(ids)
        if size > self.max_bytes or not ids or key in self.entries:
            return
        self.entries[key] = (k.clone(), v.clone())
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (k_old, v_old) = self.entries.popitem(last=False)
            self.bytes -= 2 * k_old.numel() * k_old.element_size()

    def longest_prefix(self, ids: list[int]) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """The entry sharing the longest prefix with ``ids``: (shared length, (k, v)), or (0, None)."""
        best, best_key = 0, None
        for key in self.entries:
            n = 0
            for a, b in zip(key, ids, strict=False):
                if a != b:
                    break
                n += 1
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key]


class Engine:
    """Owns ``model`` (any model ``LeanDecoder`` runs) and ``tokenizer``; ``submit`` requests from any
    thread, events come back through each request's ``emit`` (called on the worker thread)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        context: int,
        max_active: int = 4,
        max_queue: int = 32,
        prompt_cache_bytes: int = 256 << 20,
        prefill_chunk: int = 512,
        metrics: Metrics | None = None,
        step_delay: float = 0.0,
        batch: bool = False,
        batch_min: int = 2,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context, self.max_active, self.max_queue = context, max_active, max_queue
        self.prefill_chunk = prefill_chunk  # prompts longer than this prefill in turns of this many tokens
        self.step_delay = step_delay  # seconds slept after each token (tests make streams slow with it)
        self.batch = batch  # decoding requests take their tokens together (``batched_step``)
        self.batch_min = max(2, batch_min)  # ... when at least this many are decoding
        self.metrics = metrics or Metrics()
        self.cache = PromptCache(prompt_cache_bytes)
        self.eos = _eos_ids(model)
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.active: list[GenRequest] = []
        self.lock = threading.Condition()
        self.tokenizer_lock = threading.Lock()
        self.stopping = False
        self.error: str | None = None  # set if the worker died
        self._seeds = itertools.count(int(time.time_ns() % (1 << 31)))
        self.thread = threading.Thread(target=self._run, name="sparseland-engine", daemon=True)
        self.thread.start()

    # -- called from other threads ------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"the queue holds {len(self.waiting)} waiting requests (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self.lock.notify()

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """``text``'s token ids (``special_tokens``: as the tokenizer adds them, e.g. a BOS). Under the
        tokenizer's lock: a Rust tokenizer used from two threads at once can fail ("Already borrowed")."""
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def depth(self) -> tuple[int, int]:
        """(waiting, active) requests now."""
        with self.lock:
            return len(self.waiting), len(self.active)

    def healthy(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and not self.active:
                        self.lock.wait()
                    if self.stopping:
                        return
                    for req in [r for r in self.waiting if r.cancelled.is_set()]:
                        self.waiting.remove(req)
                        self.metrics.cancelled += 1
                    while self.waiting and len(self.active) < self.max_active:
                        self.active.append(self.waiting.popleft())
                    turn = list(self.active)
                self._round(turn)
                for req in turn:
                    if req.finish_reason is not None or req.cancelled.is_set():
                        self._finish(req)
                if self.step_delay:
                    time.sleep(self.step_delay)
        except BaseException as exc:  # noqa: BLE001 - the worker must report its death, whatever it was
            self.error = f"{type(exc).__name__}: {exc}"
            for req in list(self.active) + list(self.waiting):
                req.emit(Event(finish_reason="error", error="the engine stopped: " + self.error))
            raise

    def _finish(self, req: GenRequest) -> None:
        with self.lock:
            self.active.remove(req)
        req.finished_at = time.perf_counter()
        dec, req.decoder = req.decoder, None
        if req.cancelled.is_set() and req.finish_reason is None:
            self.metrics.cancelled += 1
            return
        self.metrics.finished(req)
        if dec is not None and self._can_reuse(dec) and dec.pos > 0:
            ids = (req.prompt_ids + req.tokens)[: dec.pos]  # the entries the cache holds
            self.cache.put(ids, dec.k_cache[:, :, : dec.pos], dec.v_cache[:, :, : dec.pos])
            self.metrics.cache_bytes = self.cache.bytes

    def _can_reuse(self, dec: LeanDecoder) -> bool:
        return (
            self.cache.max_bytes > 0
            and dec.k_cache is not None
            and dec.kv_dtype == "float32"
            and getattr(self.model, "_sparseland_attention", None) is None
        )

    def _round(self, turn: list[GenRequest]) -> None:
        """One turn each: a prefill chunk or one token. With ``batch``, the requests that are decoding
        (prompt done, float32 cache, no attention method) take their token in one ``batched_step``."""
        batch = [r for r in turn if self._batchable(r)] if self.batch else []
        if len(batch) >= self.batch_min:
            t0 = time.perf_counter()
            try:
                logits = batched_step([r.decoder for r in batch], [r.tokens[-1] for r in batch])
            except Exception:  # noqa: BLE001 - each request then takes its own step, which reports its error
                batch = []
            else:
                self.metrics.timed("batched_decode", time.perf_counter() - t0, len(batch))
                for req, row in zip(batch, logits, strict=True):
                    self._take(req, row)
        else:
            batch = []
        done = {id(r) for r in batch}
        for req in turn:
            if id(req) not in done:
                self._turn(req)

    def _batchable(self, req: GenRequest) -> bool:
        dec = req.decoder
        return (
            dec is not None
            and not req.cancelled.is_set()
            and dec.pos >= len(req.prompt_ids)
            and batch_reason(dec) is None
        )

    def _turn(self, req: GenRequest) -> None:
        if req.cancelled.is_set():
            return
        try:
            t0 = time.perf_counter()
            if req.decoder is None:
                self._start(req)
            dec = req.decoder
            n_prompt = len(req.prompt_ids)
            if dec.pos < n_prompt:  # (the rest of) the prefill, in chunks
                chunk = req.prompt_ids[dec.pos : dec.pos + self.prefill_chunk]
                logits = dec.step(torch.tensor([chunk]))
                self.metrics.timed("prefill", time.perf_counter() - t0, len(chunk))
                if dec.pos < n_prompt:
                    return
            else:
                logits = dec.step(torch.tensor([[req.tokens[-1]]]))
                self.metrics.timed("decode", time.perf_counter() - t0, 1)
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the others
            req.finish_reason = "error"
            req.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            return
        self._take(req, logits)

    def _take(self, req: GenRequest, logits: torch.Tensor) -> None:
        """Choose the request's next token from ``logits`` (vocab,) and emit the text it completes."""
        try:
            tok = sample_token(logits, req.temperature, req.top_p, req.generator)
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the others
            req.finish_reason = "error"
            req.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            return
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
        req.tokens.append(tok)
        self._emit_text(req, final=len(req.tokens) >= req.max_tokens)
        self.metrics.timed("detokenize", time.perf_counter() - now, 0)

    def _start(self, req: GenRequest) -> None:
        n_prompt = len(req.prompt_ids)
        dec = LeanDecoder(self.model, n_prompt + req.max_tokens)
        reused = 0
        if self._can_reuse(dec):
            shared, kv = self.cache.longest_prefix(req.prompt_ids)
            reused = min(shared, n_prompt - 1)  # at least one prompt token is fed: its logits start the answer
            if reused > 0:
                dec.k_cache[:, :, :reused] = kv[0][:, :, :reused]
                dec.v_cache[:, :, :reused] = kv[1][:, :, :reused]
                dec.pos = reused
                dec.n_cached = [reused] * len(dec.n_cached)
        self.metrics.cache_lookup(reused)
        req.cached_tokens = reused
        seed = req.seed if req.seed is not None else next(self._seeds)
        req.generator = torch.Generator().manual_seed(seed)
        req.decoder = dec

    def _emit_text(self, req: GenRequest, final: bool) -> None:
        """Decode the answer so far, cut it at the first stop string, and emit what is certain: text
        that no later token can change (not a partial character, not a possible start of a stop string)."""
        tok = req.tokens[-1]
        eos = tok in self.eos and not req.ignore_eos
        ids = req.tokens[:-1] if eos else req.tokens
        with self.tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hit = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if hit:
            text, final, req.finish_reason = text[: min(hit)], True, "stop"
        elif eos:
            final, req.finish_reason = True, "stop"
        elif final:
            req.finish_reason = "length"
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a character split across tokens
                safe = len(text.rstrip("\ufffd"))
            held = max((k for s in req.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = min(safe, len(text) - held)
        req.text = text
        delta = text[req.sent : max(safe, req.sent)]
        req.sent += len(delta)
        if delta or final:
            req.emit(Event(delta=delta, finish_reason=req.finish_reason))
