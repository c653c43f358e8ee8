"""The bounded argparse types (sparseland/cliargs.py): values in range parse, values outside (and text
that is no number) give one argparse error naming the value and the range."""

import argparse
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseland.cli import ArgumentParser
from sparseland.cliargs import bounded, fraction, non_negative_int, positive_int, share


def _error(parse, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        parse(text)
    return str(exc.value)


@pytest.mark.parametrize(
    ("kw", "inside", "outside", "interval"),
    [
        ({"lo": 0, "hi": 1}, ["0", "1", "0.5"], ["-0.1", "1.01"], "[0, 1]"),
        ({"lo": 0, "hi": 1, "hi_open": True}, ["0", "0.999"], ["1", "-1e-9"], "[0, 1)"),
        ({"lo": 0, "hi": 1, "lo_open": True}, ["1", "1e-9"], ["0", "2"], "(0, 1]"),
        ({"lo": 0, "hi": 1, "lo_open": True, "hi_open": True}, ["0.5"], ["0", "1"], "(0, 1)"),
    ],
)
def test_two_sided_ranges_keep_their_ends(kw, inside, outside, interval):
    parse = bounded(float, **kw)
    for text in inside:
        assert parse(text) == float(text)
    for text in outside:
        assert _error(parse, text) == f"{float(text)} is outside {interval}"


def test_one_sided_and_integer_ranges():
    assert positive_int("3") == 3 and isinstance(positive_int("3"), int)
    assert _error(positive_int, "0") == "0 must be >= 1; pass a positive integer"
    assert _error(positive_int, "1.5") == "'1.5' is not an integer; pass a positive integer"
    assert non_negative_int("0") == 0
    assert "-1 must be >= 0" in _error(non_negative_int, "-1")
    above = bounded(float, lo=0, lo_open=True)
    assert _error(above, "0") == "0.0 must be > 0"
    below = bounded(int, hi=10)
    assert below("-5") == -5 and _error(below, "11") == "11 must be <= 10"


def test_not_a_number_and_nan_are_refused():
    assert _error(fraction, "abc") == "'abc' is not a number; pass a fraction such as 0.5"
    assert "outside [0, 1)" in _error(fraction, "nan")
    assert "outside [0, 1]" in _error(share, "nan")
    assert bounded(float)("inf") == math.inf  # unbounded: any number
    assert "is not a number" in _error(bounded(float), "nan?")


def test_bad_factories_are_refused():
    with pytest.raises(TypeError):
        bounded(str)
    with pytest.raises(ValueError, match="empty"):
        bounded(float, lo=1, hi=0)
    with pytest.raises(ValueError, match="empty"):
        bounded(float, lo=1, hi=1, lo_open=True)
    assert bounded(int, lo=1, hi=1)("1") == 1


@given(st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(), st.booleans())
def test_accepts_exactly_the_interval(x, lo_open, hi_open):
    parse = bounded(float, lo=-1.0, hi=2.0, lo_open=lo_open, hi_open=hi_open)
    inside = (x > -1 if lo_open else x >= -1) and (x < 2 if hi_open else x <= 2)
    text = repr(float(x))
    if inside:
        assert parse(text) == float(text)
    else:
        assert f"{float(text)} is outside" in _error(parse, text)


def test_the_cli_prints_one_line_naming_option_value_and_range(capsys):
    p = ArgumentParser(prog="sparseland demo")
    p.add_argument("--sparsity", type=fraction)
    p.add_argument("--port", type=bounded(int, lo=1, hi=65535, name="port", hint="use 1-65535"))
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--sparsity", "1.5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "argument --sparsity: 1.5 is outside [0, 1); pass a fraction such as 0.5" in err
    with pytest.raises(SystemExit):
        p.parse_args(["--port", "70000"])
    assert "argument --port: 70000 is outside [1, 65535]; use 1-65535" in capsys.readouterr().err
    assert p.parse_args(["--port", "8000", "--sparsity", "0.5"]) == argparse.Namespace(sparsity=0.5, port=8000)
