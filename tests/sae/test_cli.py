"""`sparseland sae harvest|train|eval|sweep|browse` end to end on a tiny model, and their errors."""

from __future__ import annotations

import json
import random

import pytest

from sparseland.cli import main
from tests.models.test_loader import _word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    _word_tokenizer().save_pretrained(tmp_path / "m")
    rng = random.Random(0)
    (tmp_path / "t.txt").write_text(" ".join(f"w{rng.randrange(100)}" for _ in range(4000)))
    return tmp_path


def harvest(d, tokens: int) -> int:
    """``sparseland sae harvest`` of the tiny model's layer 1 into ``d/cache`` (16-token windows)."""
    args = ["--model", str(d / "m"), "--layer", "1", "--text", str(d / "t.txt"), "--tokens", str(tokens)]
    return main(["sae", "harvest", *args, "--eval-tokens", "150", "--seq-len", "16", "--out", str(d / "cache")])


def test_harvest_train_eval_sweep_browse(tiny_dir, capsys):
    d = tiny_dir
    common = ["--seq-len", "16"]
    assert harvest(d, 600) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert (
        main(
            [
                "sae",
                "train",
                "--cache",
                str(d / "cache"),
                "--arch",
                "topk",
                "--width",
                "64",
                "--k",
                "4",
                "--batch-size",
                "64",
                "--out",
                str(d / "sae"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "sae",
                "eval",
                "--sae",
                str(d / "sae"),
                "--json",
                "--ce-text",
                str(d / "t.txt"),
                "--ce-windows",
                "2",
                *common,
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    for key in ("fvu", "l0", "dead_fraction", "delta_ce_nats", "kl_nats", "ce_recovered"):
        assert isinstance(res[key], float), key
    assert res["l0"] <= 4 and res["kl_nats"] >= 0
    sweep = ["sae", "sweep", "--cache", str(d / "cache"), "--archs", "topk,batchtopk", "--ks", "2,4"]
    sweep += ["--width", "32", "--batch-size", "64", "--no-splice", "--out", str(d / "sweep")]
    assert main(sweep) == 0
    out = capsys.readouterr().out
    assert "batchtopk-k4" in out and (d / "sweep" / "fvu_vs_l0.png").is_file()
    rows = json.loads((d / "sweep" / "report.json").read_text())
    assert len(rows) == 4
    # resumable: a second run trains nothing (the eval.json of each run is kept)
    mtime = (d / "sweep" / "topk-k2" / "sae.safetensors").stat().st_mtime
    assert main(sweep) == 0
    assert (d / "sweep" / "topk-k2" / "sae.safetensors").stat().st_mtime == mtime
    assert main(["sae", "browse", "--sae", str(d / "sae"), "--features", "5", "--out", str(d / "f.html")]) == 0
    page = (d / "f.html").read_text()
    assert page.count("<section") == 5 and "<mark" in page and "top logits" in page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sae", "train", "--cache", "/nonexistent", "--out", "/tmp/x-sae-never"], "not an activation cache"),
        (["sae", "train", "--cache", "/nonexistent", "--arch", "nope", "--out", "/tmp/x"], "--arch 'nope'"),
        (["sae", "eval", "--sae", "/nonexistent"], "holds no trained SAE"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_site_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sae", "harvest", "--layer", "1", "--site", "resdi", "--out", "/tmp/x"])
    assert exc.value.code == 2 and "resdi" in capsys.readouterr().err
