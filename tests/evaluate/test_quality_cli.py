"""The CLI of the quality work: `eval --against`, `tasks`, and chat-aware `generate`, on tiny checkpoints."""

import json

import pytest

from sparseland.cli import main
from sparseland.data.chat import chat_ids
from sparseland.runtime.checkpoint import save_sparse_checkpoint
from sparseland.runtime.generate import greedy_generate
from tests.conftest import make_tiny_llama
from tests.data.test_chat import chat_tokenizer
from tests.models.test_loader import _word_tokenizer
from tests.runtime.helpers import magnitude_prune_

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoints(tmp_path):
    dense = make_tiny_llama(vocab=128)
    a = save_sparse_checkpoint(dense, chat_tokenizer(), tmp_path / "dense", metadata={})
    magnitude_prune_(dense, 0.5)
    b = save_sparse_checkpoint(dense, chat_tokenizer(), tmp_path / "pruned", metadata={})
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{(i * 7) % 100}" for i in range(2000)))
    return str(a), str(b), str(text)


def test_eval_against(checkpoints, capsys):
    dense, pruned, text = checkpoints
    common = ["--text", text, "--seq-len", "32", "--max-windows", "4", "--json"]
    assert main(["eval", "--model", dense, "--against", dense, *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["n_tokens"] == 4 * 31
    assert main(["eval", "--model", pruned, "--against", dense, *common]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["kl_mean"] > 1e-4 and diff["kl_p99"] >= diff["kl_mean"] and diff["top1_agreement"] <= 1
    assert main(["eval", "--model", pruned, "--against", dense, *common[:-1]]) == 0
    assert "top-1" in capsys.readouterr().out


def test_eval_chat_needs_against(checkpoints, capsys):
    assert main(["eval", "--model", checkpoints[0], "--chat"]) == 2
    assert "--against" in capsys.readouterr().err


def test_tasks_command(checkpoints, capsys, tmp_path):
    dense, pruned, _ = checkpoints
    out = tmp_path / "tasks.json"
    args = ["tasks", "--model", pruned, "--against", dense, "--limit", "3", "--json", "--out", str(out)]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["items"]) == 3 and len(res["results"]) == 2 and res["paired"]["n"] == 3
    assert json.loads(out.read_text()) == res
    assert main(["tasks", "--model", dense, "--kinds", "essays"]) == 2
    assert "unknown task kind" in capsys.readouterr().err


def test_generate_uses_the_chat_template_unless_raw(checkpoints, capsys):
    dense = checkpoints[0]
    base = ["generate", "--model", dense, "--prompt", "w1 w2", "--max-new-tokens", "4", "--json"]
    assert main(base) == 0
    chat = json.loads(capsys.readouterr().out)
    tok = chat_tokenizer()
    from sparseland.models import load_model

    model, _ = load_model(dense)
    expected = tok.decode(greedy_generate(model, chat_ids(tok, "w1 w2", "w5"), 4).tokens, skip_special_tokens=True)
    assert chat["chat_template"] is True
    assert main([*base, "--system", "w5"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected
    assert main([*base, "--raw"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["chat_template"] is False
    assert main([*base, "--raw", "--system", "w5"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err


def test_generate_without_template_continues_raw_text(tmp_path, capsys):
    ck = save_sparse_checkpoint(make_tiny_llama(vocab=128), _word_tokenizer(), tmp_path / "ck", metadata={})
    assert main(["generate", "--model", str(ck), "--prompt", "w1", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] is False
    assert main(["generate", "--model", str(ck), "--prompt", "w1", "--system", "w2"]) == 2
    assert "no chat template" in capsys.readouterr().err


def _calib_args(**kw):
    import argparse

    base = {"calib_samples": 4, "seq_len": 16, "seed": 0, "calib_text": None, "calib_chat": 0.0, "model": "m"}
    return argparse.Namespace(**{**base, **kw})


def test_calibration_sources(tmp_path, monkeypatch):
    from sparseland.cli import calibration_from_args
    from sparseland.data.chat import chat_tokens, self_chat
    from sparseland.data.text import load_corpus

    monkeypatch.setenv("SPARSELAND_CACHE", str(tmp_path))
    monkeypatch.setattr("sparseland.data.chat.instructions", lambda split: ["w1 w2", "w3", "w4 w5 w6"])  # fast
    model, tok = make_tiny_llama(vocab=128), chat_tokenizer()
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    corpus = load_corpus(tok, text)
    windows, info = calibration_from_args(_calib_args(), model, tok, corpus)
    assert windows.equal(corpus.calibration(4, 16, 0)) and info["chat_share"] == 0  # the old default, unchanged
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{50 + i % 40}" for i in range(200)))
    windows, info = calibration_from_args(_calib_args(calib_text=str(other)), model, tok, corpus)
    assert (windows >= 53).all() and info["text"] == str(other)  # w50.. are ids 53..
    windows, info = calibration_from_args(_calib_args(calib_chat=1.0), model, tok, corpus)
    stream = chat_tokens(tok, self_chat(model, tok, "calib"))  # cached by the call above
    starts = [i for i in range(len(stream) - 15) if stream[i : i + 16].equal(windows[0])]
    assert starts and info["chat_conversations"] == len(self_chat(model, tok, "calib"))
    windows, _ = calibration_from_args(_calib_args(calib_chat=0.5), model, tok, corpus)
    in_text = [any(corpus.calib[i : i + 16].equal(w) for i in range(len(corpus.calib) - 15)) for w in windows]
    assert sum(in_text) == 2


def test_prune_calib_chat_needs_a_chat_template(tmp_path, capsys):
    ck = save_sparse_checkpoint(make_tiny_llama(vocab=128), _word_tokenizer(), tmp_path / "ck", metadata={})
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    args = ["prune", "--model", str(ck), "--text", str(text), "--seq-len", "16", "--calib-samples", "2"]
    assert main([*args, "--calib-chat", "--out", str(tmp_path / "o")]) == 2
    assert "chat template" in capsys.readouterr().err
    assert main([*args, "--calib-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--calib-chat", "1.5", "--out", str(tmp_path / "o")])


def test_finetune_on_chat_data(tmp_path, monkeypatch, capsys):
    from sparseland.runtime.checkpoint import read_manifest

    monkeypatch.setenv("SPARSELAND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sparseland.data.chat.instructions", lambda split: ["w1 w2", "w3", "w4 w5 w6"])  # fast
    teacher = make_tiny_llama(vocab=128)
    dense = save_sparse_checkpoint(teacher, chat_tokenizer(), tmp_path / "dense", metadata={})
    magnitude_prune_(teacher, 0.5)
    pruned = save_sparse_checkpoint(teacher, chat_tokenizer(), tmp_path / "pruned", metadata={})
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{(i * 7) % 100}" for i in range(3000)))
    args = ["finetune", "--model", str(pruned), "--teacher", str(dense), "--text", str(text), "--seq-len", "32"]
    args += ["--steps", "2", "--batch-size", "2", "--eval-windows", "0", "--no-progress", "--chat", "0.5"]
    assert main([*args, "--out", str(tmp_path / "ft")]) == 0
    assert "50% of them from the teacher's own chat answers" in capsys.readouterr().out
    assert read_manifest(tmp_path / "ft")["metadata"]["data"]["chat_share"] == 0.5
    assert list((tmp_path / "cache" / "chat").glob("*.json"))  # the teacher's answers, cached
