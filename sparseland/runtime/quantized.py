"""Runtime formats for quantized weights (``sparseland.quant``): which kernel format a
``QuantizedWeight`` becomes.

- dense 4-bit codes                      -> ``Q4DenseFormat`` (qformats.py, csrc/qdense.cpp)
- dense symmetric 8-bit codes, one scale per row or per group of 32/64/128 -> ``Q8DenseFormat``
- 4-bit codes with a mask that is 2:4 or 4:8 (at most 4 kept per 8 columns) -> ``Q4NMFormat`` (qsparse.py)
- 4-bit codes with any other mask        -> ``Q4BitmaskFormat``
- anything else (8-bit with a mask, asymmetric 8-bit) -> the float formats of the dequantized
  weight (``make_format``), so the result is still exact, only not smaller in memory.
"""

from __future__ import annotations

import torch

from sparseland.quant.scheme import QuantizedWeight
from sparseland.runtime.formats import make_format


def fits_four_per_byte(mask: torch.Tensor, symmetric: bool) -> bool:
    """Whether the 4-per-byte N:M format holds this mask: every 8 consecutive columns of a row keep at most
    4, and exactly 4 for an asymmetric grid (which has no exact zero to fill a short group with)."""
    if mask.shape[1] % 8:
        return False
    counts = mask.view(mask.shape[0], -1, 8).sum(-1)
    return bool((counts <= 4).all() if symmetric else (counts == 4).all())


def make_quant_format(qw: QuantizedWeight, format: str = "auto"):
    """The runtime format of ``qw``; ``format`` may force ``q4``, ``q8``, ``q4_nm`` or ``q4_bitmask``."""
    from sparseland.runtime.qformats import Q4DenseFormat, Q8DenseFormat
    from sparseland.runtime.qsparse import Q4BitmaskFormat, Q4NMFormat

    s = qw.scheme
    forced = {"q4": Q4DenseFormat, "q8": Q8DenseFormat, "q4_nm": Q4NMFormat, "q4_bitmask": Q4BitmaskFormat}
    if format in forced:
        return forced[format].from_quantized(qw)
    if s.bits == 4 and qw.mask is None:
        return Q4DenseFormat.from_quantized(qw)
    if s.bits == 8 and qw.mask is None and s.symmetric:  # QuantScheme allows only groups of 0/32/64/128
        return Q8DenseFormat.from_quantized(qw)
    if s.bits == 4 and qw.mask is not None:
        fmt = Q4NMFormat if fits_four_per_byte(qw.mask, s.symmetric) else Q4BitmaskFormat
        return fmt.from_quantized(qw)
    return make_format(qw.dequantize(), "auto" if format == "auto" else format)


QUANT_FORMATS = ("q4", "q8", "q4_nm", "q4_bitmask")
