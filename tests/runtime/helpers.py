"""Test helpers: magnitude masks made with torch.topk (independent of sparseland.weights), and the
fused decode step compared with the Python step."""

from __future__ import annotations

import pytest
import torch


def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5, pattern: str | None = None) -> None:
    """Zero the smallest-magnitude entries of every Linear weight except lm_head, in place."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head") or mod.weight.numel() == 0:
                continue
            w = mod.weight
            if pattern:
                n, m = (int(v) for v in pattern.split(":"))
                g = w.view(w.shape[0], -1, m)  # (out, in/m, m)
                drop = g.abs().topk(m - n, dim=-1, largest=False).indices
                g.scatter_(-1, drop, 0.0)
            else:
                k = int(round(w.numel() * sparsity))
                if k:
                    w.view(-1)[w.abs().view(-1).topk(k, largest=False).indices] = 0.0


def require_fast_step() -> None:
    from sparseland.runtime import fastpath

    if not fastpath.available():
        pytest.skip("C++ extension without decode_step.cpp")


def prompt(seed: int = 0, T: int = 7, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def compare_fast_and_python(
    model, steps: int = 6, prompt_len: int = 7, mode: str = "region", threads: int = 1, seed: int = 0, atol=2e-5
) -> list[int]:
    """The fused and the Python decode step side by side on the same tokens: the prompt's logits equal
    (both run the Python step unless prompt_len == 1), every decode step's within ``atol``, the KV caches
    too, greedy choices equal up to near-ties; returns the greedy tokens."""
    from sparseland.runtime import fastpath
    from sparseland.runtime.generate import LeanDecoder

    require_fast_step()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = LeanDecoder(model, prompt_len + steps)
        ref = LeanDecoder(model, prompt_len + steps)
        assert fast.fast is not None, fastpath.ineligible_reason(model, fast.k_cache)
        fast.fast.mode = mode
        ref.fast = None
        ids = prompt(seed, prompt_len)
        a, b = fast.step(ids), ref.step(ids)
        exact = prompt_len > 1
        torch.testing.assert_close(a, b, atol=0 if exact else atol, rtol=0 if exact else 1e-5)
        tokens = []
        for _ in range(steps):
            top = b.topk(2).values
            assert int(a.argmax()) == int(b.argmax()) or float(top[0] - top[1]) <= 2 * atol  # a near-tie
            tokens.append(int(b.argmax()))
            tok = torch.tensor([[tokens[-1]]])
            a, b = fast.step(tok), ref.step(tok)
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
        torch.testing.assert_close(fast.k_cache, ref.k_cache, atol=max(atol, 1e-5), rtol=1e-5)
        torch.testing.assert_close(fast.v_cache, ref.v_cache, atol=max(atol, 1e-5), rtol=1e-5)
        return tokens
    finally:
        torch.set_num_threads(old)


def fused_tracks_python(model, prompt_len: int, steps: int = 5, max_len: int = 16, threads: int = 1, rel: float = 1e-2):
    """Quantized kernels: the fused and the Python decode step on the same greedy tokens, each decode step's
    logits within ``rel`` of the Python step's (relative norm). Both run the same kernels, but the fused
    step's norms differ from torch's in the last bits and the kernels round x to int8, so a last-bit
    difference can move one x entry by one int8 step: they agree to the x-rounding error, not to float
    rounding. Returns both decoders for further checks."""
    from sparseland.runtime.generate import LeanDecoder

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, ref = LeanDecoder(model, max_len), LeanDecoder(model, max_len)
        assert fast.fast is not None, fast.fast_reason
        ref.fast = None
        ids = prompt(0, prompt_len)
        a, b = fast.step(ids), ref.step(ids)
        for _ in range(steps):
            tok = torch.tensor([[int(b.argmax())]])
            a, b = fast.step(tok), ref.step(tok)
            assert float((a - b).norm() / b.norm()) < rel
        return fast, ref
    finally:
        torch.set_num_threads(old)
