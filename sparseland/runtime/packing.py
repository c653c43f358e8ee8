"""Bit packing helpers shared by the checkpoint and the runtime formats (pure torch, CPU).

Bit order everywhere: element ``k`` of a flat sequence lives in byte ``k // (8 // b)`` at bit offset
``(k % (8 // b)) * b`` (least significant bits first), for field widths ``b`` in {1, 2, 4, 8}.
"""

from __future__ import annotations

import torch

FIELD_BITS = (1, 2, 4, 8)


def index_bits(m: int) -> int:
    """Smallest field width in FIELD_BITS that holds indices 0..m-1."""
    for b in FIELD_BITS:
        if m <= (1 << b):
            return b
    raise ValueError(f"group size {m} needs more than 8 bits per index")


def pack_fields(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of small non-negative ints (< 2**bits) into uint8. (n,) -> (ceil(n*bits/8),)."""
    if bits not in FIELD_BITS:
        raise ValueError(f"bits must be one of {FIELD_BITS}, got {bits}")
    per = 8 // bits
    x = x.reshape(-1).to(torch.int32)
    pad = (-x.numel()) % per
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.int32) * bits  # (per,)
    return (x.view(-1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_fields``: (ceil(n*bits/8),) uint8 -> (n,) int64."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    out = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (bytes, per)
    return out.reshape(-1)[:n].to(torch.int64)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, flattened row-major) -> packed uint8, 1 bit per element, LSB first."""
    return pack_fields(mask.reshape(-1).to(torch.int32), 1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed uint8 -> (n,) bool."""
    return unpack_fields(packed, 1, n).bool()


def nonzero_mask(w: torch.Tensor) -> torch.Tensor:
    """True where ``w`` is not a +0.0 bit pattern (so -0.0 survives a round trip bit-exactly)."""
    int_dtype = {4: torch.int32, 2: torch.int16, 8: torch.int64}[w.element_size()]
    return w.contiguous().view(int_dtype) != 0


def max_nonzeros_per_group(w: torch.Tensor, m: int) -> int | None:
    """Largest count of nonzeros in any group of ``m`` consecutive entries of a row; None if cols % m."""
    if w.dim() != 2 or w.shape[1] % m:
        return None
    return int(nonzero_mask(w).view(w.shape[0], -1, m).sum(-1).max()) if w.numel() else 0


def nm_split(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (rows, cols) tensor that is at most N:M along rows into kept values and in-group indices.

    Returns ``values`` (rows, cols//m, n) and ``idx`` (rows, cols//m, n) int64 in 0..m-1, ascending
    within a group; groups with fewer than ``n`` nonzeros are padded with (distinct) zero positions.
    """
    rows, cols = w.shape
    g = w.reshape(rows, cols // m, m)
    is_zero = (~nonzero_mask(g)).to(torch.int8)
    idx = torch.sort(torch.argsort(is_zero, dim=-1, stable=True)[..., :n], dim=-1).values
    return torch.gather(g, -1, idx), idx


def nm_merge(values: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of ``nm_split``: (rows, groups, n) values + indices -> (rows, groups*m) dense."""
    rows, groups, _ = values.shape
    out = values.new_zeros(rows, groups, m)
    out.scatter_(-1, idx, values)
    return out.reshape(rows, groups * m)


def pack_stream(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits (any width 1..31) into a bit stream, LSB first. (n,) -> uint8."""
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (x.reshape(-1, 1).to(torch.int64) >> shifts) & 1  # (n, bits)
    return pack_bits(stream.reshape(-1).bool())


def unpack_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_stream`` -> (n,) int64."""
    stream = unpack_bits(packed, n * bits).view(n, bits).to(torch.int64)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def combination_table(n: int, m: int) -> torch.Tensor:
    """All ascending n-subsets of range(m) in lexicographic order: (C(m, n), n) int64."""
    import itertools

    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).view(-1, n)


def combination_bits(n: int, m: int) -> int:
    """Bits per group to store the rank of one of C(m, n) index sets."""
    import math

    return max(1, (math.comb(m, n) - 1).bit_length())


def rank_combinations(idx: torch.Tensor, m: int) -> torch.Tensor:
    """(..., n) ascending in-group indices -> (...,) rank among ``combination_table(n, m)``."""
    n = idx.shape[-1]
    base = m ** torch.arange(n - 1, -1, -1, dtype=torch.int64)  # (n,)
    keys = (combination_table(n, m) * base).sum(-1)  # ascending, since combinations are lexicographic
    return torch.searchsorted(keys, (idx * base).sum(-1))


def unrank_combinations(rank: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(...,) ranks -> (..., n) ascending in-group indices."""
    return combination_table(n, m)[rank]
