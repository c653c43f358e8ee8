"""Perplexity: the standard next-token loss over non-overlapping windows.

Each window of ``T`` tokens contributes ``T - 1`` predictions (token ``t+1`` from tokens ``<= t``),
exactly what transformers computes for ``model(input_ids, labels=input_ids).loss``; the perplexity
is ``exp`` of the mean negative log-likelihood over all predictions of all windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.models.loader import model_context_length


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens
    n_windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    if tokens.dim() == 2:
        return tokens
    n = tokens.numel() // seq_len
    if n == 0:
        raise SparselandError(f"{tokens.numel()} tokens are fewer than seq_len={seq_len}; use a smaller --seq-len")
    return tokens[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens``: a 1-D stream (tiled into ``seq_len`` windows) or ``(N, T)``."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise SparselandError(f"{name}={value!r} must be a positive integer")
    windows = _windows(tokens, seq_len)
    ctx = model_context_length(model)
    if ctx is not None and windows.shape[1] > ctx:
        raise SparselandError(
            f"seq_len={windows.shape[1]} is longer than the model's context of {ctx} tokens; "
            f"pass --seq-len {ctx} or less"
        )
    if windows.shape[1] < 2:
        raise SparselandError("windows need at least 2 tokens to predict anything; use a larger --seq-len")
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_n = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress, leave=False)
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_n += batch[:, 1:].numel()
        bar.update(batch.shape[0])
    bar.close()
    mean = total_nll / total_n
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        n_tokens=total_n,
        n_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seconds=time.perf_counter() - start,
    )
