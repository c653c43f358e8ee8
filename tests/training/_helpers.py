"""Shared helpers of the sparse-training tests: a few optimizer steps of a tiny Llama on random tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.conftest import make_tiny_llama


def tiny(seed: int = 0):
    return make_tiny_llama(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=64, seed=seed)


def make_optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, optimizer, sparsifier, steps: int, seed: int = 0, after_step: Callable[[int], None] | None = None):
    """``steps`` plain steps (backward, optimizer.step, sparsifier.step); ``after_step(t)`` after each."""
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is far faster on a shared 2-core machine
    try:
        _steps(model, optimizer, sparsifier, steps, gen, after_step)
    finally:
        torch.set_num_threads(threads)


def _steps(model, optimizer, sparsifier, steps, gen, after_step) -> None:
    for t in range(1, steps + 1):
        ids = torch.randint(0, 64, (2, 12), generator=gen)  # (B, T)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        if after_step is not None:
            after_step(t)
