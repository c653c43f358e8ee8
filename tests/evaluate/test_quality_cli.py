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
