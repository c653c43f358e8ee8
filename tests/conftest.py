"""Shared fixtures: tiny random Llama models (seconds), and the real embedded model for `slow` tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# CI explores the same examples every run (a failure there is reproducible); local runs explore anew.
# No deadlines anywhere: these machines are shared, and a slow example is not a wrong one.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("local", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "local")


def make_tiny_llama(
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_pos: int = 256,
    seed: int = 0,
):
    """A small random LlamaForCausalLM in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model and tokenizer (slow tests only)."""
    from sparseland.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """One torch thread for the test: deterministic, and small ops do not crawl on a busy 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
