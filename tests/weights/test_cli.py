"""`sparseland prune`: bad input exits 2 with one line, before loading any model."""

import pytest

from sparseland.cli import main


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "-0.2"], "sparsity"),
        (["--pattern", "4:4"], "0 < N < M"),
        (["--pattern", "two-four"], "pattern"),
        (["--pattern", "2:4", "--allocation", "owl"], "N:M"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "disagrees"),
    ],
)
def test_prune_bad_input_one_line_exit_2(args, match, capsys, tmp_path):
    code = main(["prune", "--model", "bogus", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err


def test_prune_existing_out_exit_2(capsys, tmp_path):
    code = main(["prune", "--model", "bogus", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_prune_unknown_model_exit_2(capsys, tmp_path):
    code = main(["prune", "--model", "bogus-model", "--method", "magnitude", "--out", str(tmp_path / "o")])
    assert code == 2 and "bogus-model" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--method", "obs"], ["--sparsity", "half"], ["--calib-samples", "0"], []])
def test_prune_argparse_errors_exit_2(args):
    argv = ["prune", *args] if args else ["prune"]  # [] : --out is required
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_prune_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "prune" in capsys.readouterr().out
