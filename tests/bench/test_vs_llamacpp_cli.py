"""benchmarks/bench_vs_llamacpp.py without llama.cpp: a clear message and exit code 2 (nothing measured)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vs_llamacpp.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_missing_binaries_exit_2_with_advice(tmp_path):
    (tmp_path / "llama-bench").write_text("")  # present but not the other two
    proc = _run("--llama-bin", str(tmp_path))
    assert proc.returncode == 2
    assert "llama-quantize" in proc.stderr and "llama-perplexity" in proc.stderr
    assert "build_llamacpp.sh" in proc.stderr
    assert proc.stdout == ""


def test_no_llama_bin_exit_2():
    proc = _run()
    assert proc.returncode == 2
    assert "--llama-bin" in proc.stderr


def test_help_documents_every_flag():
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in ("--llama-bin", "--ours", "--threads", "--rounds", "--quick", "--skip-perplexity"):
        assert flag in proc.stdout
