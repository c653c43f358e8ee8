"""Fixtures: a tiny random Llama, 50% pruned and saved with ``save_sparse_checkpoint`` together with a
word-level tokenizer that has a chat template; servers over it on free ports, in a thread of the test
process, talked to over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import make_tiny_llama
from tests.runtime.helpers import magnitude_prune_

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
MODEL_ID = "tiny-sparse"


def word_tokenizer(vocab_size: int = 256):
    """Words w6 ... w255 and the role names, one token per word; decode joins with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "system": 3, "user": 4, "assistant": 5}
    vocab.update({f"w{i}": i for i in range(6, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from sparseland.runtime.checkpoint import save_sparse_checkpoint

    model = make_tiny_llama(max_pos=256, seed=5)
    magnitude_prune_(model, 0.5)
    out = tmp_path_factory.mktemp("serve") / MODEL_ID
    return save_sparse_checkpoint(model, word_tokenizer(), out, metadata={"method": "magnitude", "sparsity": 0.5})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    engine: object
    server: object
    thread: threading.Thread
    model: torch.nn.Module
    tokenizer: object

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def metric(self, name: str) -> float:
        import httpx

        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint):
    """(model, tokenizer, info) as ``sparseland serve`` loads the checkpoint: on the sparse runtime."""
    from sparseland.serve import load_for_serving

    return load_for_serving(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def start_server(loaded):
    """A factory: ``start_server(**engine_options)`` runs a server over the tiny model on a free port."""
    from sparseland.serve import Engine, make_server
    from sparseland.serve.app import build_app

    torch.set_num_threads(1)
    started: list[Running] = []

    def start(**options) -> Running:
        model, tok, info = loaded
        engine = Engine(model, tok, context=options.pop("context", 256), **options)
        server = make_server(build_app(engine, MODEL_ID, info), "127.0.0.1", free_port())
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        run = Running(f"http://127.0.0.1:{port}", engine, server, thread, model, tok)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


@pytest.fixture(scope="session")
def server(start_server):
    """The default server: 4 slots, a queue of 32, prompt cache on."""
    return start_server()
