"""The MoE decode kernel (csrc/moe.cpp) against its PyTorch reference, over shapes and expert runs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.runtime import kernels
from sparseland.runtime.moe import moe_mlp, moe_mlp_reference, segments

has_op = kernels.extension_available() and hasattr(torch.ops.sparseland, "moe_mlp")


def _runs(I: int, cuts: list[int], on: list[bool]) -> torch.Tensor:
    bounds = sorted({0, I, *[c % (I + 1) for c in cuts]})
    pairs = list(zip(bounds[:-1], bounds[1:], strict=True))
    runs = [[a, b] for (a, b), keep in zip(pairs, (on * len(bounds))[: len(pairs)], strict=True) if keep]
    return torch.tensor(runs, dtype=torch.long).reshape(-1, 2)


@pytest.mark.skipif(not has_op, reason="the C++ extension with moe_mlp is not built")
@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(1, 80),
    I=st.integers(1, 200),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    on=st.lists(st.booleans(), min_size=1, max_size=9),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
def test_kernel_equals_reference(H, I, cuts, on, threads, seed):
    g = torch.Generator().manual_seed(seed)
    wg, wu, wdt = (torch.randn(I, H, generator=g) for _ in range(3))
    x = torch.randn(1, H, generator=g)
    segs = _runs(I, cuts, on)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch.ops.sparseland.moe_mlp(x, wg, wu, wdt, segs)
    finally:
        torch.set_num_threads(old)
    ref = moe_mlp_reference(x.double(), wg.double(), wu.double(), wdt.double(), segs).float()
    # float32 sums in another order: the error grows with the sum of |terms| over the active neurons
    scale = float(ref.abs().max()) + 1.0
    torch.testing.assert_close(y, ref, atol=2e-6 * scale * max(H, 1) ** 0.5, rtol=1e-4)


@pytest.mark.skipif(not has_op, reason="the C++ extension with moe_mlp is not built")
def test_kernel_rejects_overlapping_runs():
    w = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="ascending"):
        torch.ops.sparseland.moe_mlp(torch.randn(1, 4), w, w, w, torch.tensor([[0, 4], [2, 6]]))


def test_reference_is_the_dense_mlp_restricted_to_the_runs():
    g = torch.Generator().manual_seed(0)
    wg, wu, wd = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g), torch.randn(5, 12, generator=g)
    x = torch.randn(1, 5, generator=g)
    keep = torch.zeros(12)
    keep[0:3] = keep[6:9] = 1
    dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T) * keep) @ wd.T
    segs = torch.tensor([[0, 3], [6, 9]])
    torch.testing.assert_close(moe_mlp_reference(x, wg, wu, wd.t().contiguous(), segs), dense)
    with kernels.force_reference():
        torch.testing.assert_close(moe_mlp(x, wg, wu, wd.t().contiguous(), segs), dense)


def test_segments_merge_adjacent_experts():
    class M:
        n_shared, expert_size = 4, 2

    sel = torch.tensor([True, True, False, True, False])
    assert segments(M, sel).tolist() == [[0, 8], [10, 12]]
    assert segments(M, torch.zeros(5, dtype=torch.bool)).tolist() == [[0, 4]]
