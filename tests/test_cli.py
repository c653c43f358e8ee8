"""CLI user errors: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from sparseland.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparseland.cli", *args], capture_output=True, text=True, timeout=120)


def test_unknown_model_is_one_line_exit_2():
    r = run_cli("eval", "--model", "bogus-model")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "smollm2-135m" in lines[0]


def test_missing_text_file(capsys, tmp_path):
    code = main(["eval", "--model", "smollm2-135m", "--text", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("flag", ["--seq-len", "--batch-size", "--max-windows"])
def test_non_positive_sizes_exit_2(flag):
    with pytest.raises(SystemExit) as exc:
        main(["eval", flag, "0"])
    assert exc.value.code == 2


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval" in capsys.readouterr().out


@pytest.mark.slow
def test_seq_len_beyond_context_exit_2(capsys):
    code = main(["eval", "--seq-len", "9000"])
    assert code == 2 and "context of 8192" in capsys.readouterr().err
