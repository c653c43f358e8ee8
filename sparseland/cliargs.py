"""argparse value types with a range: ``bounded(float, lo=0, hi=1, hi_open=True)`` parses a number and
refuses one outside [0, 1) with a message naming the value and the allowed range (argparse prefixes the
option: ``argument --sparsity: 1.5 is outside [0, 1); pass a fraction such as 0.5``).

The shared types every subcommand uses are defined here once (``positive_int``, ``non_negative_int``,
``fraction``, ``share``); a module with a range of its own makes its type with ``bounded`` too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "any value"


def bounded(
    kind: type = float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    name: str | None = None,
    hint: str | None = None,
) -> Callable[[str], int | float]:
    """An argparse ``type=``: text -> ``kind`` (int or float) within the range given by ``lo``/``hi``
    (None: unbounded on that side; ``lo_open``/``hi_open``: that end excluded). A bad value raises
    ``argparse.ArgumentTypeError`` naming the value and the range, then ``hint`` (how to fix it).
    ``name`` is the type's name (argparse shows it in some messages; default: the range)."""
    if kind not in (int, float):
        raise TypeError(f"bounded() parses int or float, not {kind!r}")
    if lo is not None and hi is not None and not (lo < hi or (lo == hi and not lo_open and not hi_open)):
        raise ValueError(f"bounded(): the range {_interval(lo, hi, lo_open, hi_open)} is empty")
    interval = _interval(lo, hi, lo_open, hi_open)
    two_sided = lo is not None and hi is not None
    suffix = f"; {hint}" if hint else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{suffix}") from None
        ok = not (isinstance(value, float) and math.isnan(value))
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            where = f"is outside {interval}" if two_sided else f"must be {interval}"
            raise argparse.ArgumentTypeError(f"{value} {where}{suffix}")
        return value

    parse.__name__ = name or f"{kind.__name__} {interval}"
    parse.__qualname__ = parse.__name__
    parse.__doc__ = f"argparse type: {'an integer' if kind is int else 'a number'} ({interval})."
    return parse


positive_int = bounded(int, lo=1, name="positive_int", hint="pass a positive integer")
non_negative_int = bounded(int, lo=0, name="non_negative_int", hint="pass 0 or a positive integer")
fraction = bounded(float, lo=0, hi=1, hi_open=True, name="fraction", hint="pass a fraction such as 0.5")
share = bounded(float, lo=0, hi=1, name="share", hint="pass a share such as 0.5 (1: chat only)")

__all__ = ["bounded", "fraction", "non_negative_int", "positive_int", "share"]
