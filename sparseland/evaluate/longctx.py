"""Long-context accuracy: run the RULER-style samples of ``sparseland.data.longctx`` through a model.

Each sample is decoded greedily (batch 1) and scored with RULER's ``string_match_all`` (fraction of
the expected answers found in the output, case-insensitive); a cell (task, length) reports the mean
in percent over its samples, the number of samples, the mean prompt tokens and the seconds spent.

Two decode loops give the same tokens for the dense model:
- ``"lean"``: ``sparseland.runtime.greedy_generate`` (our own forward, preallocated KV cache; fast);
- ``"hf"``: the model's own forward with its KV cache, one token at a time. It runs whatever attention
  function is registered with transformers, so sparse attention methods applied by ``sparsify_``
  take effect in it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sparseland.data.longctx import LongCtxSample, encode_prompt, score_all, score_part
from sparseland.errors import SparselandError

BACKENDS = ("lean", "hf")


@dataclass
class SampleResult:
    task: str
    length: int
    depth: float | None
    index: int
    prompt_tokens: int
    answers: list[str]
    output: str
    score: float  # string_match_all, in [0, 1]
    score_part: float  # string_match_part, in [0, 1]
    prefill_seconds: float
    seconds: float  # prefill + decode


@dataclass
class LongCtxResult:
    """Per-sample results of one model configuration (``label``), with per-cell summaries."""

    label: str
    backend: str
    samples: list[SampleResult] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # e.g. method, sparsity, measured attention sparsity

    def cells(self) -> list[dict]:
        """One row per (task, length) in first-seen order: accuracy (%), n, mean prompt tokens, seconds."""
        groups: dict[tuple[str, int], list[SampleResult]] = {}
        for s in self.samples:
            groups.setdefault((s.task, s.length), []).append(s)
        return [
            {
                "task": task,
                "length": length,
                "accuracy": 100.0 * sum(s.score for s in group) / len(group),
                "accuracy_part": 100.0 * sum(s.score_part for s in group) / len(group),
                "n": len(group),
                "prompt_tokens": sum(s.prompt_tokens for s in group) / len(group),
                "seconds": sum(s.seconds for s in group),
                "prefill_seconds": sum(s.prefill_seconds for s in group),
            }
            for (task, length), group in groups.items()
        ]

    def accuracy(self, task: str | None = None, length: int | None = None) -> float:
        """Mean score in percent over the samples matching ``task`` / ``length`` (None: all)."""
        sel = [s for s in self.samples if task in (None, s.task) and length in (None, s.length)]
        if not sel:
            raise SparselandError(f"no samples for task={task!r} length={length!r}")
        return 100.0 * sum(s.score for s in sel) / len(sel)

    def table(self) -> str:
        return format_table([self])

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "backend": self.backend,
            "info": self.info,
            "cells": self.cells(),
            "samples": [asdict(s) for s in self.samples],
        }


def format_table(results: Sequence[LongCtxResult]) -> str:
    """Accuracy (%) per task (rows) and length (columns), one block of columns per result, side by side."""
    if not results:
        return ""
    tasks = list(dict.fromkeys(s.task for r in results for s in r.samples))
    lengths = sorted({s.length for r in results for s in r.samples})
    cols = [(r, n) for r in results for n in lengths]
    head = ["task"] + [f"{r.label} @{n}" if len(results) > 1 else f"{n}" for r, n in cols]
    rows = []
    for task in tasks + ["mean"]:
        row = [task]
        for r, n in cols:
            sel = [s for s in r.samples if s.length == n and (task == "mean" or s.task == task)]
            row.append(f"{100.0 * sum(s.score for s in sel) / len(sel):.1f}" if sel else "-")
        rows.append(row)
    n_row = ["samples"] + [str(sum(s.length == n for s in r.samples)) for r, n in cols]
    tok_row = ["prompt tok"]
    sec_row = ["s/sample"]
    for r, n in cols:
        sel = [s for s in r.samples if s.length == n]
        tok_row.append(f"{sum(s.prompt_tokens for s in sel) / len(sel):.0f}" if sel else "-")
        sec_row.append(f"{sum(s.seconds for s in sel) / len(sel):.1f}" if sel else "-")
    table = [head, *rows, n_row, tok_row, sec_row]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(rows) + 2, "-" * len(lines[0]))
    return "\n".join(lines)


def _eos_ids(model: torch.nn.Module) -> set[int]:
    from sparseland.runtime.generate import _eos_ids as eos

    return eos(model)


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode through the model's own forward and KV cache; returns (new tokens, prefill seconds)."""
    eos = _eos_ids(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)  # ids: (1, T)
    prefill = time.perf_counter() - t0
    past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    tokens = [tok]
    while len(tokens) < max_new_tokens and tok not in eos:
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens.append(tok)
    return tokens, prefill


def _generate(
    model, ids: torch.Tensor, max_new_tokens: int, backend: str, kv_dtype: str = "float32", kv_keep: float = 0.5
) -> tuple[list[int], float]:
    if backend == "lean":
        from sparseland.runtime import greedy_generate

        res = greedy_generate(model, ids, max_new_tokens, kv_dtype=kv_dtype, kv_keep=kv_keep)
        return res.tokens, res.prefill_seconds
    return hf_greedy(model, ids, max_new_tokens)


def evaluate_longctx(
    model: torch.nn.Module,
    tokenizer,
    samples: Sequence[LongCtxSample],
    max_new_tokens: int | None = None,
    progress: bool = True,
    backend: str = "lean",
    label: str = "dense",
    kv_dtype: str = "float32",
    kv_keep: float = 0.5,
) -> LongCtxResult:
    """Greedy-decode every sample and score it; ``max_new_tokens`` None uses each task's own budget.
    ``kv_dtype``: the lean loop's KV cache, ``"float32"``, ``"int8"`` or ``"sparse"`` (keeping
    ``kv_keep`` of each K/V vector's entries) (``LeanDecoder``)."""
    from sparseland.runtime.generate import KV_DTYPES

    if backend not in BACKENDS:
        raise SparselandError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if kv_dtype not in KV_DTYPES:
        raise SparselandError(f"kv_dtype={kv_dtype!r} is unknown; use one of {list(KV_DTYPES)}")
    from sparseland.runtime.generate import _check_kv_keep

    _check_kv_keep(kv_keep)
    if kv_dtype != "float32" and backend != "lean":
        raise SparselandError(f"kv_dtype={kv_dtype!r} needs the lean backend (backend='lean'), not {backend!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens <= 0):
        raise SparselandError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not samples:
        raise SparselandError("no samples to evaluate; generate some with sparseland.data.longctx.generate_samples")
    from sparseland.models.loader import model_context_length

    ctx = model_context_length(model)
    model.eval()
    result = LongCtxResult(label=label, backend=backend)
    bar = tqdm(samples, desc=f"longctx {label}", unit="sample", disable=not progress, leave=False)
    for sample in bar:
        ids = torch.tensor([encode_prompt(tokenizer, sample.prompt)], dtype=torch.long)  # (1, T)
        new = max_new_tokens or sample.max_new_tokens
        if ctx is not None and ids.shape[1] + new > ctx:
            raise SparselandError(
                f"a {sample.task} sample has {ids.shape[1]} prompt tokens + {new} to generate, more than the "
                f"model's context of {ctx}; generate samples with lengths <= {ctx}"
            )
        bar.set_postfix(task=sample.task, length=sample.length)
        t0 = time.perf_counter()
        tokens, prefill = _generate(model, ids, new, backend, kv_dtype, kv_keep)
        seconds = time.perf_counter() - t0
        output = tokenizer.decode(tokens, skip_special_tokens=True)
        result.samples.append(
            SampleResult(
                task=sample.task,
                length=sample.length,
                depth=sample.depth,
                index=sample.index,
                prompt_tokens=ids.shape[1],
                answers=list(sample.answers),
                output=output,
                score=score_all(output, sample.answers),
                score_part=score_part(output, sample.answers),
                prefill_seconds=prefill,
                seconds=seconds,
            )
        )
    return result
