"""``sparseland serve`` from the command line: help, bad input as one line, and (slow) the real
embedded model served by the CLI in a subprocess, its greedy chat answer equal to ``greedy_generate``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from sparseland.cli import main
from tests.serve.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_help_names_the_routes(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "/v1/chat/completions" in out and "--prompt-cache-mb" in out and "--max-queue" in out


def test_bad_model_is_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseland: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_port_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "70000"])
    assert exc.value.code == 2 and "--port: 70000 is outside [1, 65535]; use 1-65535" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("process_argv", "env", "reruns"),
    [(["serve", "--model", "m"], None, True), (["serve"], "ACTIVE", False), (None, None, False)],
)
def test_serve_reruns_itself_with_passive_openmp_once(monkeypatch, process_argv, env, reruns):
    """Its own command line (not main(argv) called in-process), OMP_WAIT_POLICY unset: re-run with PASSIVE;
    a policy already set (the re-run, or the user's) is kept."""
    import argparse

    from sparseland.serve import cli

    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, argv, environ: calls.append((exe, argv, environ)))
    if env is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", env)
    args = argparse.Namespace(**({} if process_argv is None else {"process_argv": process_argv}))
    cli._passive_openmp(args)
    if reruns:
        ((exe, argv, environ),) = calls
        assert exe == sys.executable and argv == [sys.executable, "-m", "sparseland.cli", *process_argv]
        assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    else:
        assert calls == []


@pytest.mark.slow
def test_embedded_model_served_by_the_cli(embedded):
    import openai

    from sparseland.runtime.generate import greedy_generate

    model, tok = embedded
    port = free_port()
    cmd = [sys.executable, "-m", "sparseland.cli", "serve", "--port", str(port), "--threads", "1"]
    cmd += ["--no-sparse-runtime", "--model-name", "smol"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=20, temperature=0)
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            want = greedy_generate(model, ids, 20)
        finally:
            torch.set_num_threads(old)
        assert r.choices[0].message.content == tok.decode(want.tokens, skip_special_tokens=True)
        assert r.usage.prompt_tokens == ids.shape[1] and r.usage.completion_tokens == len(want.tokens)
        assert "Paris" in r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
