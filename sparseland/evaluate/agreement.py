"""Agreement with a reference model: KL divergence of the next-token distributions and top-1 agreement.

The measures llama.cpp reports for its quantizations (``llama-perplexity --kl-divergence``), computed
at every predicted position ``t`` (token ``t+1`` from tokens ``<= t``) of the same windows for both
models:

- ``KL(reference || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))``, in nats; reported as
  the mean and the 99th percentile over positions (the tail is where a compressed model breaks);
- top-1 agreement: the share of positions where both models' most likely next token is the same;
- the perplexity of both models on the same predictions, for reference.

Streamed: one batch of windows at a time, the reference's logits computed once per batch and shared by
every compared model; only the per-position KL values (one float each) are kept, so no model's logits
over the whole text ever sit in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.evaluate.perplexity import _windows
from sparseland.models.loader import model_context_length


@dataclass
class AgreementResult:
    kl_mean: float  # mean KL(reference || model) per predicted position (nats)
    kl_p99: float  # 99th percentile of the per-position KL
    kl_max: float
    top1_agreement: float  # share of positions with the same argmax, in [0, 1]
    perplexity: float  # the model's perplexity on the same predictions
    reference_perplexity: float
    n_tokens: int  # predicted positions
    n_windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``KL(softmax(ref) || softmax(logits))`` (nats) and whether the argmaxes agree.

    ``ref_logits``, ``logits``: ``(..., V)``; returns two tensors of shape ``(...)`` (float32, bool)."""
    if ref_logits.shape != logits.shape:
        raise SparselandError(
            f"reference logits {tuple(ref_logits.shape)} and model logits {tuple(logits.shape)} differ in shape; "
            "compare models with the same vocabulary"
        )
    ref_logp = F.log_softmax(ref_logits.float(), -1)
    logp = F.log_softmax(logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)  # rounding can give -1e-9
    return kl, ref_logits.argmax(-1) == logits.argmax(-1)


def _check(models: Mapping[str, torch.nn.Module], reference: torch.nn.Module, windows: torch.Tensor) -> None:
    if not models:
        raise SparselandError("no models to compare with the reference; pass at least one")
    if windows.shape[1] < 2:
        raise SparselandError("windows need at least 2 tokens to predict anything; use a larger --seq-len")
    for name, m in [("reference", reference), *models.items()]:
        ctx = model_context_length(m)
        if ctx is not None and windows.shape[1] > ctx:
            raise SparselandError(
                f"seq_len={windows.shape[1]} is longer than the context of {name} ({ctx} tokens); "
                f"pass --seq-len {ctx} or less"
            )
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    for name, m in models.items():
        vocab = m.get_output_embeddings().weight.shape[0]
        if vocab != ref_vocab:
            raise SparselandError(
                f"{name} has a vocabulary of {vocab} tokens, the reference {ref_vocab}; compare a model with "
                "a compressed copy of itself (same tokenizer)"
            )


@torch.inference_mode()
def compare(
    models: Mapping[str, torch.nn.Module],
    reference: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, AgreementResult]:
    """KL / top-1 agreement / perplexity of every model in ``models`` against ``reference`` on ``tokens``
    (a 1-D stream tiled into ``seq_len`` windows, or ``(N, T)`` windows); one pass over the windows with
    the reference's logits computed once per batch. A model that *is* the reference gets KL 0, agreement 1."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise SparselandError(f"{name}={value!r} must be a positive integer")
    windows = _windows(tokens, seq_len)
    _check(models, reference, windows)
    for m in (reference, *models.values()):
        m.eval()
    device = next(reference.parameters()).device
    acc = {k: {"nll": 0.0, "kl": [], "agree": 0, "seconds": 0.0} for k in models}
    ref_nll, n = 0.0, 0
    bar = tqdm(total=windows.shape[0], desc="agreement", unit="win", disable=not progress, leave=False)
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)  # (B, T)
        targets = batch[:, 1:].reshape(-1)
        ref = reference(input_ids=batch).logits[:, :-1]
        ref = ref.reshape(-1, ref.shape[-1]).float()  # (B*(T-1), V)
        ref_nll += float(F.cross_entropy(ref, targets, reduction="sum"))
        n += targets.numel()
        for name, model in models.items():
            t0 = time.perf_counter()
            logits = ref if model is reference else model(input_ids=batch).logits[:, :-1].reshape(ref.shape).float()
            a = acc[name]
            a["nll"] += float(F.cross_entropy(logits, targets, reduction="sum"))
            kl, same = kl_top1(ref, logits)
            a["kl"].append(kl)
            a["agree"] += int(same.sum())
            a["seconds"] += time.perf_counter() - t0
            del logits
        del ref
        bar.update(batch.shape[0])
    bar.close()
    out = {}
    for name, a in acc.items():
        kl = torch.cat(a["kl"])
        out[name] = AgreementResult(
            kl_mean=float(kl.mean()),
            kl_p99=float(np.quantile(kl.numpy(), 0.99)),  # linear interpolation, as torch.quantile
            kl_max=float(kl.max()),
            top1_agreement=a["agree"] / n,
            perplexity=math.exp(a["nll"] / n),
            reference_perplexity=math.exp(ref_nll / n),
            n_tokens=n,
            n_windows=int(windows.shape[0]),
            seq_len=int(windows.shape[1]),
            seconds=a["seconds"],
        )
    return out


def agreement(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 1,
    progress: bool = True,
) -> AgreementResult:
    """KL divergence (mean, p99), top-1 agreement and perplexity of ``model`` against ``reference`` on
    ``tokens`` (see ``compare``)."""
    return compare({"model": model}, reference, tokens, seq_len, batch_size, progress)["model"]
