"""Quantization schemes and the in-memory quantized weight: the contract between quantizers
(round-to-nearest, GPTQ, SparseGPT's joint prune + quantize), checkpoints and runtime formats.

A weight W (out, in) is stored as unsigned integer codes ``q`` in ``[0, 2**bits)`` with one scale
``d`` and one offset ``m`` per row and per group of ``group`` consecutive columns::

    W[r, c] = d[r, c // group] * q[r, c] + m[r, c // group]       (float32 arithmetic, two roundings)

``d`` and ``m`` are float16. Symmetric schemes store no ``m``: it is ``-2**(bits-1) * d`` (so the
value is ``d * (q - 8)`` for 4 bits, ``d * (q - 128)`` for 8 bits). Asymmetric schemes store ``m``
(the group's minimum, llama.cpp Q4_1 style). ``group == 0`` means one group per row (per output
channel). Groups always run over *columns*, also for a sparse weight: a pruned entry (``mask`` False)
has code 0, dequantizes to exactly +0.0, and takes no part in choosing its group's scale.

Scheme names: ``int4-g32`` (asymmetric, groups of 32: exactly llama.cpp's Q4_1 grid), ``int4-g64``,
``int4-g128``, ``int4-g32-sym`` (... ``-sym``: symmetric, Q4_0 style), ``int8`` (symmetric, per output
channel), ``int8-g32`` ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparseland.errors import SparselandError

GROUP_SIZES = (0, 32, 64, 128)
_NAME = re.compile(r"^int(?P<bits>4|8)(?:-g(?P<group>\d+))?(?P<sym>-sym|-asym)?$")


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4  # 4 or 8
    group: int = 32  # columns per scale; 0 = one per row
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SparselandError(f"bits={self.bits} is not supported; use 4 or 8")
        if self.group not in GROUP_SIZES:
            raise SparselandError(f"group={self.group} is not supported; use one of {GROUP_SIZES} (0 = per row)")

    @classmethod
    def parse(cls, name: str | QuantScheme) -> QuantScheme:
        """``int4-g32`` (asymmetric), ``int4-g64-sym``, ``int8`` (symmetric per channel), ``int8-g32``."""
        if isinstance(name, QuantScheme):
            return name
        m = _NAME.match(str(name).strip().lower())
        if m is None:
            raise SparselandError(
                f"quantization scheme {name!r} is not understood; use e.g. int4-g32, int4-g64-sym, int4-g128, int8"
            )
        bits = int(m["bits"])
        group = int(m["group"]) if m["group"] else (32 if bits == 4 else 0)
        sym = m["sym"] == "-sym" if m["sym"] else bits == 8
        return cls(bits, group, sym)

    @property
    def name(self) -> str:
        g = f"-g{self.group}" if self.group else ""
        default_sym = self.bits == 8
        s = "" if self.symmetric == default_sym else ("-sym" if self.symmetric else "-asym")
        return f"int{self.bits}{g}{s}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def group_size(self, in_features: int) -> int:
        """Columns per group for a weight with ``in_features`` columns (checks divisibility)."""
        g = self.group or in_features
        if in_features % g:
            raise SparselandError(
                f"{self.name}: {in_features} columns are not a multiple of the group size {g}; "
                f"use a group that divides {in_features} (e.g. int{self.bits}-g32)"
            )
        return g

    def bits_per_weight(self, density: float = 1.0, in_features: int = 4096) -> float:
        """Storage bits per weight of the values and scales (masks not included)."""
        g = self.group or in_features
        per_group = 16 if self.symmetric else 32
        return density * self.bits + per_group / g


@dataclass
class QuantizedWeight:
    """A quantized (and possibly pruned) weight: ``codes`` (out, in) uint8, ``scale`` (out, G) float16,
    ``offset`` (out, G) float16 or None (symmetric), ``mask`` (out, in) bool or None (dense: all kept)."""

    scheme: QuantScheme
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    mask: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group(self) -> int:
        return self.scheme.group_size(self.codes.shape[1])

    def offsets(self) -> torch.Tensor:
        """(out, G) float32 offsets ``m`` (computed from the scales for a symmetric scheme)."""
        if self.offset is not None:
            return self.offset.float()
        return self.scale.float() * -float(1 << (self.scheme.bits - 1))

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32: ``d * q + m`` per group, +0.0 where pruned."""
        return dequantize(self.codes, self.scale, self.offset, self.scheme, self.mask)

    def density(self) -> float:
        return 1.0 if self.mask is None else float(self.mask.float().mean())

    def nbytes(self) -> int:
        """Honest storage bytes: packed codes of kept entries, scales, offsets, and a 1-bit mask if sparse."""
        out, inp = self.shape
        kept = out * inp if self.mask is None else int(self.mask.sum())
        n = (kept * self.scheme.bits + 7) // 8 + self.scale.numel() * 2
        if self.offset is not None:
            n += self.offset.numel() * 2
        if self.mask is not None:
            n += (out * inp + 7) // 8
        return n


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    scheme: QuantScheme,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    out, inp = codes.shape
    g = scheme.group_size(inp)
    d = scale.float().repeat_interleave(g, dim=1)  # (out, in)
    m = d * -float(1 << (scheme.bits - 1)) if offset is None else offset.float().repeat_interleave(g, dim=1)
    w = d * codes.float() + m  # two roundings, as every reader of the format computes it
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    return w + 0.0  # -0.0 -> +0.0


def group_params(
    w: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scale and offset of every group of ``w`` (out, n_cols) as one group per row
    (the caller slices ``w`` to one group of columns): returns (out,) float16 ``d`` and (out,) float16
    ``m`` (None if symmetric). Pruned entries (``mask`` False) are ignored.

    Asymmetric (Q4_1 rule): ``d = (max - min) / qmax``, ``m = min`` (range always includes 0 only if
    the data does). Symmetric 4-bit (Q4_0 rule): the entry of largest magnitude maps to code 0 (value
    -8 d), ``d = that entry / -8``. Symmetric 8-bit (Q8_0 rule): ``d = max|w| / 127``, codes in [1, 255]
    (values -127 d .. 127 d), so a Q8_0-dequantized weight (the shipped file's token embeddings) comes back
    exactly with ``int8-g32``.
    """
    w = w.float()
    if mask is not None:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, torch.full_like(w, big)).amin(1)
        hi = torch.where(mask, w, torch.full_like(w, -big)).amax(1)
        empty = ~mask.any(1)
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    else:
        lo, hi = w.amin(1), w.amax(1)
    if scheme.symmetric and scheme.bits == 8:
        return (torch.maximum(hi.abs(), lo.abs()) / 127.0).half(), None
    if scheme.symmetric:
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)  # signed value of largest magnitude
        d = (extreme / -float(1 << (scheme.bits - 1))).half()
        return d, None
    d = ((hi - lo) / scheme.qmax).half()
    return d, lo.half()


def quantize_codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Codes of ``w`` (out, n) on the grid ``d * q + m`` with (out,) or (out, n) float32 ``d``, ``m``:
    ``round((w - m) / d)`` clamped to ``[0, qmax]`` (0 where ``d == 0``)."""
    d = d.float().reshape(w.shape[0], -1)
    m = m.float().reshape(w.shape[0], -1)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((w.float() - m) / safe).clamp_(0, scheme.qmax)
    return torch.where(d == 0, torch.zeros_like(q), q).to(torch.uint8)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme | str, mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (out, in), group by group. If ``mask`` (out, in) bool is
    given, pruned entries (False) keep code 0, dequantize to +0.0 and are ignored when choosing scales.
    Rebuilding a Q4_1-dequantized weight with ``int4-g32`` gives back its exact values."""
    scheme = QuantScheme.parse(scheme)
    w = w.detach().float()
    out, inp = w.shape
    g = scheme.group_size(inp)
    wg = w.reshape(out, inp // g, g).transpose(0, 1).reshape(-1, g)  # (G*out, g), group-major
    mg = None if mask is None else mask.reshape(out, inp // g, g).transpose(0, 1).reshape(-1, g)
    d, m = group_params(wg, scheme, mg)
    mm = m.float() if m is not None else d.float() * -float(1 << (scheme.bits - 1))
    q = quantize_codes(wg, d.float(), mm, scheme)
    if mg is not None:
        q = torch.where(mg, q, torch.zeros_like(q))
    G = inp // g
    codes = q.reshape(G, out, g).transpose(0, 1).reshape(out, inp).contiguous()
    scale = d.reshape(G, out).T.contiguous()
    offset = None if m is None else m.reshape(G, out).T.contiguous()
    return QuantizedWeight(scheme, codes, scale, offset, None if mask is None else mask.clone())
