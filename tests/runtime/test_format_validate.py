"""``validate()`` on runtime formats built from tensors (not ``from_dense``): malformed tensors are one
``SparselandError`` before any kernel indexes with them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.runtime.formats import ActSparseBitmaskFormat, BitmaskFormat, NMFormat


def _w(out=6, inp=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) > 0.5)


def _nm(out=6, inp=16):
    w = torch.randn(out, inp)
    g = w.view(out, -1, 4)
    g.scatter_(-1, g.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    return NMFormat.from_dense(w)


def test_from_dense_formats_validate():
    assert BitmaskFormat.from_dense(_w()).validate() is not None
    assert BitmaskFormat.from_dense(_w(inp=16), torch.bfloat16).validate() is not None
    assert ActSparseBitmaskFormat.from_dense(_w(out=13)).validate() is not None
    assert _nm().validate() is not None
    assert _nm(inp=12).validate() is not None  # padded to a whole byte


def _replace(f, **kw):
    return dataclasses.replace(f, **kw)


@pytest.mark.parametrize("cls", [BitmaskFormat, ActSparseBitmaskFormat])
def test_bitmask_malformed(cls):
    f = cls.from_dense(_w())
    rp, vals, mask = f.row_ptr, f.values, f.mask
    bad_first = rp.clone()
    bad_first[0] = 1
    swapped = rp.clone()
    swapped[1], swapped[2] = rp[2].item(), rp[1].item()
    short_end = rp.clone()
    short_end[-1] -= 1
    flipped = mask.clone()
    flipped[0, 0] ^= 1
    cases = {
        "starts at 1": dict(row_ptr=bad_first),
        "row 0 spans": dict(row_ptr=swapped),
        "spans": dict(row_ptr=short_end),
        "int64": dict(row_ptr=rp.to(torch.int32)),
        "expected int64": dict(row_ptr=rp[:-1]),
        "padding": dict(values=vals[:-1]),
        "bits set": dict(mask=flipped),
        "uint8": dict(mask=mask.to(torch.int16)),
        "1-D": dict(values=vals.to(torch.float64)),
    }
    for match, kw in cases.items():
        with pytest.raises(SparselandError, match=match.replace("(", r"\(")):
            _replace(f, **kw).validate()


def test_bitmask_bits_past_the_last_column():
    f = BitmaskFormat.from_dense(torch.ones(2, 12))  # 12 columns: bits 4..7 of byte 1 are padding
    mask = f.mask.clone()
    mask[0, 1] |= 0x80
    rp = f.row_ptr.clone()
    rp[1:] += 1
    vals = torch.cat([f.values, f.values.new_zeros(1)])
    with pytest.raises(SparselandError, match="past column 12"):
        _replace(f, mask=mask, row_ptr=rp, values=vals).validate()


def test_nm_malformed():
    f = _nm()
    three = f.mask.clone()
    three[1, 1] |= 0xFF
    uneven = f.mask.clone()
    uneven[0, 0] = 0b00001111  # 4 bits in the byte, but 4 in one group of 4 and 0 in the other
    with pytest.raises(SparselandError, match="row 1 group 2 has 4 bits set"):
        _replace(f, mask=three).validate()
    with pytest.raises(SparselandError, match="row 0 group 0 has 4 bits set, not 2"):
        _replace(f, mask=uneven).validate()
    with pytest.raises(SparselandError, match="padding"):
        _replace(f, values=f.values[:-3]).validate()
    with pytest.raises(SparselandError, match="not 3:4"):
        _replace(f, n=3).validate()
    with pytest.raises(SparselandError, match="expected uint8"):
        _replace(f, mask=f.mask[:, :1]).validate()
