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


def _bench_module():
    import importlib.util

    if "bench_vs_llamacpp" in sys.modules:
        return sys.modules["bench_vs_llamacpp"]
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_llama_kl_parses_llama_perplexity_output(tmp_path):
    """The --kl-divergence summary lines as llama-perplexity prints them (tools/perplexity/perplexity.cpp)."""
    tool = tmp_path / "llama-perplexity"
    tool.write_text(
        "#!/bin/sh\ncat >&2 <<'X'\n"
        "Mean PPL(Q)                   :  10.176000 ±   0.123000\n"
        "Mean PPL(base)                :  10.156000 ±   0.120000\n"
        "Mean PPL(Q)/PPL(base)         :   1.002000 ±   0.001000\n"
        "Mean    KLD:   0.001234 ±   0.000012\n"
        "Maximum KLD:   0.900000\n"
        "99.9%   KLD:   0.100000\n"
        "99.0%   KLD:   0.012345\n"
        "Same top p: 97.125 ± 0.123 %\n"
        "X\n"
    )
    tool.chmod(0o755)
    got = _bench_module().llama_kl(tool, tmp_path / "m.gguf", tmp_path / "base.kld", 2, 4)
    assert got == {
        "ppl": 10.176,
        "ppl_stderr": 0.123,
        "ppl_ratio_to_base": 1.002,
        "kld_mean": 0.001234,
        "kld_p99": 0.012345,
        "same_top": 0.97125,
    }


def test_dominance_needs_both_quality_and_speed():
    B = _bench_module()

    def row(engine, fmt, tok_s, ratio, kld):
        return {"engine": engine, "format": fmt, "decode_tok_s_median": tok_s, "ppl_ratio": ratio, "kld_mean": kld}

    rows = [
        row("llama.cpp", "Q8_0", 150, 1.006, 0.002),
        row("llama.cpp", "Q4_0", 240, 1.23, 0.2),
        row("sparseland", "fast-bad", 300, 1.22, 0.25),  # beats Q4_0 on ratio, not on KL
        row("sparseland", "slow-good", 149, 1.001, 0.001),  # good but slower than Q8_0
    ]
    assert B.dominance(rows, "ppl_ratio") == [{"rung": "Q8_0", "by": None}, {"rung": "Q4_0", "by": "fast-bad"}]
    assert B.dominance(rows, "kld_mean") == [{"rung": "Q8_0", "by": None}, {"rung": "Q4_0", "by": None}]


def test_window_scores_kl_is_zero_against_itself_and_positive_otherwise(tmp_path):
    import torch

    from tests.conftest import make_tiny_llama

    B = _bench_module()
    windows = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama(seed=1).eval()
    base = tmp_path / "base.npy"
    nll0, kl0, top0 = B.window_scores(model, windows, base, write_base=True, batch_size=2)
    assert nll0.shape == (3, 15) and kl0.shape == top0.shape == (3, 7)  # T - 1 - T/2 scored positions
    nll1, kl1, top1 = B.window_scores(model, windows, base, write_base=False, batch_size=2)
    assert torch.allclose(nll0, nll1) and float(kl1.abs().max()) < 1e-5 and bool(top1.all())
    other = make_tiny_llama(seed=2).eval()
    _, kl2, _ = B.window_scores(other, windows, base, write_base=False, batch_size=2)
    assert float(kl2.min()) >= -1e-6 and float(kl2.mean()) > 1e-3


def test_rerender_takes_the_ratio_on_llama_cpp_scoring_for_both_engines(tmp_path):
    import json

    def row(engine, fmt, ppl, half=None):
        p = {"ppl": ppl} if half is None else {"ppl": ppl, "ppl_second_half": half}
        return {"engine": engine, "format": fmt, "perplexity": p, "decode_tok_s_median": 100.0,
                "decode_tok_s_min": 90.0, "decode_tok_s_max": 110.0, "ratio_to_ref_median": 1.0,
                "ratio_to_ref_rounds": [1.0], "size_mb": 1.0, "size_kind": "GGUF file"}  # fmt: skip

    rows = [row("llama.cpp", "F32", 10.0), row("llama.cpp", "Q4_1", 10.1), row("sparseland", "dense", 12.0, 10.0)]
    rows.append(row("sparseland", "int4", 12.6, 10.2))
    meta = {"command": "x", "threads": 2, "rounds": 1, "reps": 1, "new_tokens": 8, "date": "d", "eval": None}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"meta": meta, "rows": rows}))
    assert _bench_module().rerender(saved, tmp_path, "out") == 0
    got = {r["format"]: r for r in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert abs(got["Q4_1"]["ppl_ratio"] - 1.01) < 1e-9
    assert abs(got["int4"]["ppl_ratio"] - 1.02) < 1e-9  # second half, not 12.6 / 12.0
    assert abs(got["int4"]["ppl_ratio_all_positions"] - 1.05) < 1e-9
    assert (tmp_path / "out.md").is_file() and (tmp_path / "out.png").is_file()
