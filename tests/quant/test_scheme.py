"""QuantScheme parsing, round-to-nearest quantization and its defining properties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseland.errors import SparselandError
from sparseland.quant import QuantScheme, quantize_rtn


def q41_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A weight made the way llama.cpp dequantizes a Q4_1 tensor: per 32 columns fp16 d, m and codes with
    the block's min at code 0 and its max at code 15 (quantize_row_q4_1's rule), value d * q + m in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(out, inp // 32, 32, generator=g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    q = ((x - m.float()) / d.float() + 0.5).floor().clamp(0, 15)
    return (d.float() * q + m.float()).reshape(out, inp)


def test_parse_names():
    assert QuantScheme.parse("int4-g32") == QuantScheme(4, 32, False)
    assert QuantScheme.parse("int4-g64-sym") == QuantScheme(4, 64, True)
    assert QuantScheme.parse("int8") == QuantScheme(8, 0, True)
    assert QuantScheme.parse("INT4") == QuantScheme(4, 32, False)
    for name in ("int4-g32", "int4-g128-sym", "int8", "int8-g32", "int8-asym"):
        assert QuantScheme.parse(name).name == name
    for bad in ("int3", "int4-g48", "fp8", "int4-g32-foo"):
        with pytest.raises(SparselandError, match="not"):
            QuantScheme.parse(bad)


def test_group_must_divide_columns():
    with pytest.raises(SparselandError, match="not a multiple of the group size 128"):
        quantize_rtn(torch.randn(4, 576), "int4-g128")


def test_q4_1_grid_is_reproduced_exactly():
    """The embedded model's weights are a dequantized Q4_1 file: int4-g32 (asymmetric) gives them back."""
    w = q41_weight(48, 256)
    qw = quantize_rtn(w, "int4-g32")
    assert torch.equal(qw.dequantize(), w)
    assert not torch.equal(quantize_rtn(w, "int4-g32-sym").dequantize(), w)


@given(
    out=st.integers(1, 9),
    groups=st.integers(1, 4),
    scheme=st.sampled_from(["int4-g32", "int4-g32-sym", "int4-g64", "int8", "int8-g32"]),
    seed=st.integers(0, 10**6),
)
def test_rtn_error_within_half_step(out, groups, scheme, seed):
    s = QuantScheme.parse(scheme)
    inp = 64 * groups
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    qw = quantize_rtn(w, s)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= s.qmax
    g = s.group_size(inp)
    step = qw.scale.float().abs().repeat_interleave(g, dim=1)  # one quantization step per entry
    err = (qw.dequantize() - w).abs()
    # round to nearest: half a step (a symmetric grid ends one step short of -extreme: a whole step
    # there), plus the fp16 rounding of the scale and offset (a few steps of 2^-11)
    half = 1.0 if s.symmetric else 0.5
    assert bool((err <= half * step + 2e-3 * w.abs().amax(1, keepdim=True) + 1e-6).all())


def test_mask_keeps_zeros_and_ignores_them_for_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(8, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    pruned = torch.where(mask, w, torch.zeros(()))
    qw = quantize_rtn(pruned, "int4-g32", mask)
    d = qw.dequantize()
    assert torch.equal(d[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.signbit(d[~mask]).any()
    # the scales come from the kept entries only: the group's kept min/max are hit exactly
    lo = torch.where(mask, w, torch.full_like(w, 1e9)).view(8, 2, 32).amin(-1)
    assert torch.equal(qw.offset.float(), lo.half().float())
    assert qw.nbytes() == (int(mask.sum()) + 1) // 2 + 2 * 16 * 2 + 64 * 8 // 8


def test_bits_per_weight():
    assert QuantScheme.parse("int4-g32").bits_per_weight() == 5.0
    assert QuantScheme.parse("int4-g32-sym").bits_per_weight() == 4.5
    assert QuantScheme.parse("int4-g64").bits_per_weight(density=0.5) == pytest.approx(2.5)
