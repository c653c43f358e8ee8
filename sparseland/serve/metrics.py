"""Counters of the server, rendered in the Prometheus text exposition format (version 0.0.4).

Written by the engine's worker thread and the HTTP handlers; read by ``/metrics``. Plain integers and
floats updated under the GIL: a scrape may see one request's counters half updated, never corrupt ones.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparseland.serve.engine import GenRequest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.responses: collections.Counter[tuple[str, int]] = collections.Counter()  # (path, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished_requests = 0
        self.cancelled = 0  # the client went away before the answer was complete
        self.rejected = 0  # 503: the queue was full
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_n = 0
        self.decode_tokens = 0  # tokens after each answer's first
        self.decode_seconds = 0.0
        self.last_decode_tps = 0.0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_reused_tokens = 0
        self.cache_bytes = 0
        # where the worker's time goes: part -> [seconds, tokens, calls]; parts: prefill (prompt chunks),
        # decode (one request's token, the fused step), batched_decode (several requests' tokens in one
        # step), detokenize (sampling excluded: the answer's text, stop strings, the event)
        self.engine_parts: dict[str, list[float]] = {}

    def timed(self, part: str, seconds: float, tokens: int) -> None:
        acc = self.engine_parts.setdefault(part, [0.0, 0, 0])
        acc[0] += seconds
        acc[1] += tokens
        acc[2] += 1

    def cache_lookup(self, reused: int) -> None:
        if reused:
            self.cache_hits += 1
            self.cache_reused_tokens += reused
        else:
            self.cache_misses += 1

    def finished(self, req: GenRequest) -> None:
        self.finished_requests += 1
        self.prompt_tokens += len(req.prompt_ids)
        self.completion_tokens += len(req.tokens)
        if req.ttft is not None:
            self.ttft_sum += req.ttft
            self.ttft_n += 1
            for i, b in enumerate(TTFT_BUCKETS):
                if req.ttft <= b:
                    self.ttft_counts[i] += 1
            n = len(req.tokens) - 1
            seconds = req.finished_at - req.first_token_at
            if n > 0 and seconds > 0:
                self.decode_tokens += n
                self.decode_seconds += seconds
                self.last_decode_tps = n / seconds

    def render(self, waiting: int, active: int, model: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:.17g}" for labels, value in samples)

        resp = sorted(self.responses.items()) or [(("/v1/completions", 200), 0)]
        metric(
            "sparseland_http_responses_total",
            "counter",
            "HTTP responses by path and status code.",
            [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in resp],
        )
        m = f'{{model="{model}"}}'
        simple = [
            ("requests_finished_total", "counter", "Generations completed.", self.finished_requests),
            ("requests_cancelled_total", "counter", "Clients gone before the end of their answer.", self.cancelled),
            ("requests_rejected_total", "counter", "503s: the queue was full.", self.rejected),
            ("prompt_tokens_total", "counter", "Prompt tokens of completed requests.", self.prompt_tokens),
            ("completion_tokens_total", "counter", "Generated tokens of completed requests.", self.completion_tokens),
            ("queue_depth", "gauge", "Requests waiting for a slot.", waiting),
            ("active_requests", "gauge", "Requests being decoded.", active),
            ("decode_tokens_total", "counter", "Tokens after each answer's first.", self.decode_tokens),
            ("decode_seconds_total", "counter", "Time from first to last token, summed.", self.decode_seconds),
            ("decode_tokens_per_second", "gauge", "Decode speed of the last completed answer.", self.last_decode_tps),
            ("prompt_cache_hits_total", "counter", "Prompts that reused a cached prefix.", self.cache_hits),
            ("prompt_cache_misses_total", "counter", "Prompts prefilled from scratch.", self.cache_misses),
            ("prompt_cache_reused_tokens_total", "counter", "Prompt tokens from the cache.", self.cache_reused_tokens),
            ("prompt_cache_bytes", "gauge", "Bytes held by the prompt cache.", self.cache_bytes),
        ]
        for name, kind, help_, value in simple:
            metric("sparseland_" + name, kind, help_, [(m, value)])
        parts = sorted(self.engine_parts.items())
        for j, (name, help_) in enumerate(
            [
                ("engine_seconds_total", "Worker time by part: prefill, decode, batched_decode, detokenize."),
                ("engine_tokens_total", "Tokens the worker's calls processed, by part."),
                ("engine_calls_total", "Worker calls by part (a batched_decode call runs several requests)."),
            ]
        ):
            samples = [(f'{{model="{model}",part="{p}"}}', acc[j]) for p, acc in parts]
            metric("sparseland_" + name, "counter", help_, samples or [(f'{{model="{model}",part="decode"}}', 0)])
        ttft = "sparseland_time_to_first_token_seconds"
        buckets = [(f'{{model="{model}",le="{b}"}}', c) for b, c in zip(TTFT_BUCKETS, self.ttft_counts, strict=True)]
        buckets.append((f'{{model="{model}",le="+Inf"}}', self.ttft_n))
        lines.append(f"# HELP {ttft} From arrival to the first generated token.")
        lines.append(f"# TYPE {ttft} histogram")
        lines.extend(f"{ttft}_bucket{lb} {v}" for lb, v in buckets)
        lines.append(f"{ttft}_sum{m} {self.ttft_sum:.17g}")
        lines.append(f"{ttft}_count{m} {self.ttft_n}")
        return "\n".join(lines) + "\n"
