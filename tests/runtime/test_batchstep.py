"""``batched_step``: B sequences at different positions in one pass give each sequence the logits its
own ``LeanDecoder.step`` gives (up to the several-row kernels' rounding), write the same KV caches, and
leave each decoder able to go on alone; decoders that cannot join are refused with the reason."""

from __future__ import annotations

import pytest
import torch

import sparseland as sl
from sparseland.errors import SparselandError
from sparseland.quant import QuantConfig
from sparseland.runtime.batchstep import batch_reason, batched_step
from sparseland.runtime.generate import LeanDecoder
from sparseland.runtime.modules import to_sparse_runtime_
from tests.conftest import make_tiny_llama
from tests.models.arch_configs import make_tiny
from tests.runtime.helpers import magnitude_prune_, prompt


def _model(kind: str):
    if kind in ("llama", "llama-bitmask", "llama-q4"):
        model = make_tiny_llama(seed=4)
        if kind == "llama-bitmask":
            magnitude_prune_(model, 0.5)
            to_sparse_runtime_(model, format="bitmask")
        elif kind == "llama-q4":
            sl.sparsify_(model, QuantConfig(scheme="int4-g32"))
            to_sparse_runtime_(model)
        return model
    return make_tiny(kind, seed=4)  # gemma2 (window, soft-capping), phi3 (fused qkv), olmo2 (q/k norms)


@pytest.mark.parametrize("kind", ["llama", "llama-bitmask", "llama-q4", "gemma2", "phi3", "olmo2"])
def test_batched_equals_each_sequence_alone(kind):
    model = _model(kind)
    lengths = [3, 11, 6]  # different positions; 11 > gemma2's window of 8
    steps = 5
    alone = [LeanDecoder(model, n + steps + 1) for n in lengths]
    together = [LeanDecoder(model, n + steps + 1) for n in lengths]
    toks = []
    for b, n in enumerate(lengths):
        a, t = alone[b].step(prompt(b, n)), together[b].step(prompt(b, n))
        torch.testing.assert_close(a, t, atol=0, rtol=0)  # the same prefill
        toks.append(int(a.argmax()))
    tol = 2e-2 if kind == "llama-q4" else 1e-4  # q4: the kernels round x to int8 per call (relative)
    for _ in range(steps):
        want = torch.stack([dec.step(torch.tensor([[t]])) for dec, t in zip(alone, toks, strict=True)])
        got = batched_step(together, toks)
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < tol
        toks = [int(row.argmax()) for row in want]
    for a, t in zip(alone, together, strict=True):
        assert a.pos == t.pos
        torch.testing.assert_close(a.k_cache[:, :, : a.pos], t.k_cache[:, :, : t.pos], atol=tol, rtol=tol)
        torch.testing.assert_close(a.v_cache[:, :, : a.pos], t.v_cache[:, :, : t.pos], atol=tol, rtol=tol)
    # each decoder goes on alone afterwards (the fused step reads the cache the batch wrote)
    last = together[0].step(torch.tensor([[toks[0]]]))
    ref = alone[0].step(torch.tensor([[toks[0]]]))
    assert float((last - ref).norm() / ref.norm()) < tol


def test_one_sequence_batch_equals_its_step():
    model = make_tiny_llama(seed=6)
    a, b = LeanDecoder(model, 12), LeanDecoder(model, 12)
    a.fast = None  # the Python step: the same kernels and order as a batch of one
    tok = int(a.step(prompt(1, 5)).argmax())
    b.step(prompt(1, 5))
    torch.testing.assert_close(batched_step([b], [tok])[0], a.step(torch.tensor([[tok]])), atol=1e-6, rtol=1e-6)


def test_decoders_that_cannot_join_are_refused():
    model = make_tiny_llama(seed=7)
    int8 = LeanDecoder(model, 8, kv_dtype="int8")
    plain = LeanDecoder(model, 8)
    assert batch_reason(plain) is None
    assert "int8" in batch_reason(int8)
    with pytest.raises(SparselandError, match="int8"):
        batched_step([plain, int8], [3, 4])
    other = LeanDecoder(make_tiny_llama(seed=8), 8)
    with pytest.raises(SparselandError, match="another model"):
        batched_step([plain, other], [3, 4])
    with pytest.raises(SparselandError, match="one token each"):
        batched_step([plain], [3, 4])
    full = LeanDecoder(model, 2)
    full.step(prompt(0, 2))
    with pytest.raises(SparselandError, match="cache holds 2"):
        batched_step([full], [3])
