"""Bad user input on every CLI entry point: exit 2 and one line ``sparseland: error: ...`` on stderr,
never a traceback (argparse errors included)."""

from __future__ import annotations

import pytest

from sparseland.cli import main
from sparseland.runtime.checkpoint import WEIGHTS_FILE, save_sparse_checkpoint
from tests.conftest import make_tiny_llama
from tests.models.test_loader import _word_tokenizer


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe")
    (root / "notmodel").mkdir()
    return save_sparse_checkpoint(make_tiny_llama(), _word_tokenizer(), root / "ck", metadata={})


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("sparseland: error:"), err
    assert "Traceback" not in err and match in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--model", "{ck}", "--prompt", ""], "--prompt is empty"),
        (["generate", "--model", "{ck}", "--prompt", "   "], "--prompt is empty"),
        (["generate", "--model", "{root}/missing", "--prompt", "w1"], "unknown model"),
        (["generate", "--model", "{root}/notmodel", "--prompt", "w1"], "holds no model"),
        (["generate", "--model", "{ck}", "--prompt", "w1", "--threads", "0"], "--threads: 0 must be >= 1"),
        (["generate", "--model", "{ck}", "--prompt", "w1", "--max-new-tokens", "x"], "not an integer"),
        (["generate", "--model", "{ck}", "--prompt", "w1", "--sparse-runtime", "--format", "bogus"], "bogus"),
        (["bench", "--model", "{ck}", "--prune-sparsity", "abc"], "'abc' is not a number"),
        (["bench", "--model", "{ck}", "--prune-sparsity", "1.5"], "outside [0, 1)"),
        (["bench", "--model", "{ck}", "--pattern", "4:2"], "0 < N < M"),
        (["bench", "--model", "{ck}", "--pattern", "two:four"], "not understood"),
        (["bench", "--model", "{ck}", "--pattern", "2:5", "--skip-kernels"], "not a multiple of M=5"),
        (["bench", "--model", "{ck}", "--threads", "0"], "positive integer"),
        (["prune", "--model", "{ck}", "--sparsity", "abc", "--out", "{root}/o"], "not a number"),
        (["prune", "--model", "{ck}", "--method", "magnitude", "--pattern", "4:2", "--out", "{root}/o"], "0 < N"),
        (["prune", "--model", "{root}/missing", "--out", "{root}/o"], "unknown model"),
        (["prune", "--model", "{ck}"], "--out"),
        (["eval", "--model", "{root}/notmodel"], "holds no model"),
        (["eval", "--model", "{ck}", "--text", "{root}/missing.txt"], "does not exist"),
        (["eval", "--model", "{ck}", "--text", "{root}/empty.txt"], "is empty"),
        (["eval", "--model", "{ck}", "--text", "{root}/latin1.txt"], "not UTF-8"),
        (["eval", "--model", "{ck}", "--seq-len", "0"], "positive integer"),
        (["quantize", "--model", "{ck}", "--scheme", "int3", "--out", "{root}/q"], "not understood"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(capsys, ck, argv, match):
    argv = [a.format(ck=ck, root=ck.parent) for a in argv]
    _one_line_error(capsys, argv, match)


def test_damaged_checkpoint_is_one_line(capsys, ck, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    raw = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])
    _one_line_error(capsys, ["generate", "--model", str(bad), "--prompt", "w1"], "re-save the checkpoint")
    (bad / "sparseland.json").write_text("{not json")
    _one_line_error(capsys, ["eval", "--model", str(bad)], "not readable JSON")
