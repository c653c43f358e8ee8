"""What the frontier measures on each cell's model: bytes, weight sparsity and decode speed.

``model_bytes`` is the runtime's compressed sparse checkpoint size (or an estimate without the
runtime); ``RuntimeDecodeSpeed`` decodes with the lean loop after ``to_sparse_runtime_`` (which also
gives activation-sparse layers the activation-sparse kernel); ``GreedyDecodeSpeed`` uses the plain model.
"""

from __future__ import annotations

import copy
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SpeedFn = Callable[[torch.nn.Module], dict]


# -- measurements --------------------------------------------------------------------------------
def _linear_weights(model: torch.nn.Module, *, skip_output: bool = True) -> list[torch.Tensor]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen, weights = set(), []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in seen:
            if skip_output and out_emb is not None and mod.weight is out_emb.weight:
                continue
            seen.add(id(mod.weight))
            weights.append(mod.weight)
    return weights


def estimate_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a nonzero-aware checkpoint: dense tensors as they are, and each Linear weight with
    zeros as a bitmask (1 bit per entry) plus its nonzero values, if that is smaller."""
    linear = {id(w) for w in _linear_weights(model, skip_output=False)}
    total = 0
    for p in model.parameters():  # tied parameters are listed once
        dense = p.numel() * p.element_size()
        if id(p) in linear:
            nnz = int(torch.count_nonzero(p.detach()))
            dense = min(dense, (p.numel() + 7) // 8 + nnz * p.element_size())
        total += dense
    return total


def model_bytes(model: torch.nn.Module) -> tuple[int, str]:
    """``(bytes, source)``: the size of the runtime's compressed sparse checkpoint (``"checkpoint"``)
    when the runtime is installed, else ``estimate_model_bytes`` (``"estimate"``)."""
    try:
        from sparseland.runtime.checkpoint import checkpoint_bytes, save_sparse_checkpoint
    except ImportError:
        return estimate_model_bytes(model), "estimate"
    with tempfile.TemporaryDirectory(prefix="sparseland-bytes-") as tmp:
        path = save_sparse_checkpoint(model, None, Path(tmp) / "ckpt", metadata={})
        return checkpoint_bytes(path), "checkpoint"


def measured_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over the Linear weights (the output projection excluded)."""
    weights = _linear_weights(model)
    total = sum(w.numel() for w in weights)
    zeros = sum(w.numel() - int(torch.count_nonzero(w.detach())) for w in weights)
    return zeros / total if total else 0.0


class GreedyDecodeSpeed:
    """``measure_speed``: greedy decode of ``n_tokens`` with the plain model and its KV cache, timed
    after ``warmup`` steps; the prompt's prefill is not timed."""

    def __init__(self, n_tokens: int = 32, prompt_len: int = 16, warmup: int = 4) -> None:
        self.n_tokens, self.prompt_len, self.warmup = n_tokens, prompt_len, warmup
        self.speed_id = f"torch-greedy-n{n_tokens}-p{prompt_len}"

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, self.prompt_len), generator=torch.Generator().manual_seed(0))
        out = model(input_ids=prompt, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
        t0 = 0.0
        for step in range(self.warmup + self.n_tokens):
            if step == self.warmup:
                t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - t0
        return {
            "tokens_per_s": self.n_tokens / seconds,
            "tokens": self.n_tokens,
            "seconds": seconds,
            "engine": "torch (plain)",
        }


class RuntimeDecodeSpeed:
    """``measure_speed`` with the runtime: a copy of the model gets ``SparseLinear`` layers in the
    format the runtime picks (``to_sparse_runtime_(format="auto")``: N:M, bitmask or dense) and
    decodes greedily with the lean loop; tokens/s is 1 / the median per-token time (robust to a busy
    machine's hiccups). The dense model goes through the same path, so ratios compare kernels fairly.

    The lean loop runs a token through all layers in one C++ call (``runtime.fastpath``) when the model
    allows it, and through its Python step otherwise (activation-sparsity hooks, sparse attention).
    ``path="python"`` forces the Python step, so the frontier times dense on the same path as a cell
    that cannot use the fused step (``supports_path``)."""

    supports_path = True

    def __init__(self, n_tokens: int = 32, prompt_len: int = 16, warmup: int = 4, prefill_len: int = 64) -> None:
        self.n_tokens, self.prompt_len, self.warmup, self.prefill_len = n_tokens, prompt_len, warmup, prefill_len
        self.speed_id = f"runtime-lean-auto-paths-n{n_tokens}-p{prompt_len}-prefill{prefill_len}"
        # converted copies, kept while their source model lives (the dense base is re-timed per cell)
        self._converted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _tokens_per_s(self, fast: torch.nn.Module, python: bool) -> tuple[float, float, str, str | None]:
        import contextlib
        import statistics

        from sparseland.runtime import fastpath
        from sparseland.runtime.generate import greedy_generate

        with fastpath.use(enabled=False) if python else contextlib.nullcontext():
            prompt = torch.randint(
                0, fast.config.vocab_size, (1, self.prompt_len), generator=torch.Generator().manual_seed(0)
            )
            greedy_generate(fast, prompt, self.warmup, stop_at_eos=False)
            run = greedy_generate(fast, prompt, self.n_tokens, stop_at_eos=False)
        return 1.0 / statistics.median(run.per_token_seconds), run.decode_seconds, run.path, run.path_reason

    def __call__(self, model: torch.nn.Module, path: str | None = None) -> dict[str, Any]:
        """Time ``model``; ``path`` None: the fused step if the model allows it, else the Python step;
        ``"python"``: the Python step; ``"fused"``: the fused step (an error if the model cannot use it)."""
        from sparseland.errors import SparselandError
        from sparseland.runtime import fastpath
        from sparseland.runtime.generate import greedy_generate
        from sparseland.runtime.modules import to_sparse_runtime_

        if path not in (None, "fused", "python"):
            raise SparselandError(f"path={path!r}: use None (automatic), 'fused' or 'python'")
        if model not in self._converted:
            fast = copy.deepcopy(model)
            self._converted[model] = (fast, to_sparse_runtime_(fast, format="auto"))
        fast, report = self._converted[model]
        why = "the fused step is off" if not fastpath.enabled() else fastpath.ineligible_reason(fast, torch.zeros(1))
        if path == "fused" and why is not None:
            raise SparselandError(f"this model cannot use the fused decode step: {why}")
        fused = why is None and path != "python"
        tps, seconds, ran, reason = self._tokens_per_s(fast, python=not fused)
        prompt = torch.randint(
            0, fast.config.vocab_size, (1, self.prefill_len), generator=torch.Generator().manual_seed(1)
        )
        prefill = greedy_generate(fast, prompt, 1, stop_at_eos=False)
        return {
            "tokens_per_s": tps,
            "prefill_tokens_per_s": prefill.prefill_tokens_per_s,  # a prompt of prefill_len tokens
            "path": ran,  # the step that ran the decode: fused (C++) or python
            "path_reason": reason if path != "python" else "the python path was asked for",
            "tokens": self.n_tokens,
            "seconds": seconds,
            "engine": "sparseland runtime (lean loop)",
            "formats": report.formats,
        }


def default_speed_fn(n_tokens: int = 32) -> SpeedFn:
    """The CLI's speed measurement: ``RuntimeDecodeSpeed`` when the runtime's lean loop and sparse
    modules are installed, else ``GreedyDecodeSpeed`` (the plain model)."""
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("sparseland.runtime.generate", "sparseland.runtime.modules")):
        return RuntimeDecodeSpeed(n_tokens)
    return GreedyDecodeSpeed(n_tokens)


def speed_id(measure_speed: SpeedFn | None) -> str | None:
    """A stable name for a speed function: its ``speed_id`` attribute, else its qualified name."""
    if measure_speed is None:
        return None
    return getattr(measure_speed, "speed_id", getattr(measure_speed, "__qualname__", type(measure_speed).__name__))
