"""Quantized and sparse + quantized checkpoints of the embedded model: build them, then measure the quality
of what the runtime really computes (the integer kernels, x rounded to int8 per block) against the dense
float model, and their size.

    python benchmarks/bench_quant.py --out-dir /tmp/sl-quant              # build + measure every config
    python benchmarks/bench_quant.py --out-dir /tmp/sl-quant --configs int4-g32,sparsegpt50+int4-g64

Per config: checkpoint MB (the safetensors file: codes, scales, masks, the int8 embeddings and the norms),
bits per weight of the quantized Linears, perplexity of the runtime model on the evaluation part (and its
ratio to the dense fp32 model's, computed the same way), mean and 99th-percentile KL divergence of the
next-token distributions from the dense model's, and top-1 agreement (same argmax). Decode speed against
llama.cpp's ladder is ``bench_vs_llamacpp.py``'s job: pass it ``--ours NAME=DIR`` for these checkpoints.
Writes ``benchmarks/results/quant.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import sparseland as sl
from sparseland.evaluate.agreement import compare
from sparseland.io import write_results
from sparseland.quant import QuantConfig
from sparseland.runtime.checkpoint import checkpoint_bytes, save_sparse_checkpoint

RESULTS = Path(__file__).parent / "results"
EMB = "int8-g32"  # the embeddings (and the tied lm_head): the shipped file's Q8_0 token_embd exactly
# name -> (pruning config, embeddings scheme or None for EMB) or (None, QuantConfig): a pruning config with
# quant= prunes and quantizes (SparseGPT jointly)
CONFIGS = {
    "int8": (None, QuantConfig(scheme="int8", embeddings=EMB)),
    "int4-g32": (None, QuantConfig(scheme="int4-g32", embeddings=EMB)),
    # the embeddings / tied lm_head: float32 (the ablation's floor), int8 with one scale per row, int4-g32
    # (asymmetric, 5 bits per weight with its scales: faster, less exact)
    "int4-g32+emb-fp32": (None, QuantConfig(scheme="int4-g32")),
    "int4-g32+emb-int8": (None, QuantConfig(scheme="int4-g32", embeddings="int8")),
    "int4-g32+emb-int4-g32": (None, QuantConfig(scheme="int4-g32", embeddings="int4-g32")),
    "int4-g64+emb-int4-g64": (None, QuantConfig(scheme="int4-g64", embeddings="int4-g64")),
    "int4-g32-sym-gptq": (None, QuantConfig(scheme="int4-g32-sym", method="gptq", embeddings=EMB)),
    "int4-g64-sym-gptq": (None, QuantConfig(scheme="int4-g64-sym", method="gptq", embeddings=EMB)),
    "sparsegpt25+int4-g32": (sl.SparseGPTConfig(sparsity=0.25, quant="int4-g32"), None),
    "sparsegpt50+int4-g64": (sl.SparseGPTConfig(sparsity=0.5, quant="int4-g64"), None),
    "sparsegpt2:4+int4-g64-sym": (sl.SparseGPTConfig(pattern="2:4", quant="int4-g64-sym"), None),
    "sparsegpt50+int4-g64-sym": (sl.SparseGPTConfig(sparsity=0.5, quant="int4-g64-sym"), None),
    "sparsegpt50+int4-g32-sym": (sl.SparseGPTConfig(sparsity=0.5, quant="int4-g32-sym"), None),
    # the smallest: 4-bit embeddings and lm_head too
    "sparsegpt50+int4-g64-sym+emb4": (sl.SparseGPTConfig(sparsity=0.5, quant="int4-g64-sym"), "int4-g64-sym"),
}


def build(name: str, base: torch.nn.Module, tok, calib: torch.Tensor, out: Path) -> Path:
    """The checkpoint of config ``name`` in ``out/name`` (kept if it exists)."""
    path = out / name
    if path.exists():
        return path
    prune, quant = CONFIGS[name]
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if prune is not None:
        sl.sparsify_(model, prune, calibration=calib)
        sl.quant.quantize_embeddings_(model, quant or EMB)  # quant: the embeddings' scheme, if not EMB
    else:
        sl.sparsify_(model, quant, calibration=calib if quant.needs_calibration else None)
    meta = {"config": name, "seconds": time.perf_counter() - t0, "embeddings": EMB}
    return save_sparse_checkpoint(model, tok, path, metadata=meta)


def quality(models: dict[str, torch.nn.Module], dense: torch.nn.Module, windows: torch.Tensor) -> dict[str, dict]:
    """Perplexity of each model and its KL divergence / top-1 agreement with ``dense``: one pass over the
    windows, the dense logits computed once per window (``sparseland.evaluate.agreement.compare``)."""
    res = compare(models, dense, windows, batch_size=1)
    return {
        name: {
            "perplexity": r.perplexity,
            "kl_mean": r.kl_mean,
            "kl_p99": r.kl_p99,
            "top1_agreement": r.top1_agreement,
            "predictions": r.n_tokens,
        }
        for name, r in res.items()
    }


def bits_per_weight(model: torch.nn.Module) -> float:
    from sparseland.quant import quant_state

    bits = weights = 0
    for name, m in model.named_modules():
        qw = quant_state(m)
        if qw is not None and "layers" in name:
            bits += qw.nbytes() * 8
            weights += m.weight.numel()
    return bits / max(weights, 1)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| config | checkpoint MB | bits/weight (Linears) | runtime formats | perplexity | x dense | "
        "KL mean | KL p99 | top-1 agreement |\n|---|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['config']} | {r['checkpoint_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['formats']} | "
        f"{r['perplexity']:.3f} | {r['ratio']:.3f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
        f"{r['top1_agreement']:.3f} |\n"
        for r in rows
    )
    return (
        "# Quantized and sparse + quantized checkpoints of SmolLM2-135M\n\n"
        f"`python benchmarks/bench_quant.py --out-dir DIR --windows {args.windows}` ({args.threads} threads). "
        f"Quality of the runtime model (quantized kernels, x rounded to int8 per block of 32) on {args.windows} "
        "evaluation windows of 512 tokens, against the dense float32 model on the same windows. Embeddings and "
        f"the tied lm_head: {EMB} (``+emb4``: int4-g64-sym). Calibration (GPTQ, SparseGPT): 32 windows of 512 "
        "tokens.\n\n" + head + body
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="where the checkpoints are written (kept and reused)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (default: all)")
    p.add_argument("--windows", type=int, default=55, help="evaluation windows of 512 tokens (default: all 55)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--name", default="quant", help="results file stem (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    dense, tok = sl.load_model("smollm2-135m")
    corpus = sl.load_corpus(tok)
    calib = corpus.calibration(32, 512, seed=0)
    windows = corpus.evaluation(512, args.windows)
    out = Path(args.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    dense_mb = sum(t.numel() * t.element_size() for t in dense.state_dict().values()) / 1e6  # tied: counted twice
    dense_mb -= dense.model.embed_tokens.weight.numel() * 4 / 1e6
    rows = [{"config": "dense fp32", "checkpoint_mb": dense_mb, "bits_per_weight": 32.0, "formats": "dense"}]
    models = {"dense fp32": dense}
    for name in names:
        path = build(name, dense, tok, calib, out)
        model, _ = sl.load_model(str(path))
        bpw = bits_per_weight(model)
        report = sl.to_sparse_runtime_(model)
        models[name] = model
        rows.append(
            {
                "config": name,
                "path": str(path),
                "checkpoint_mb": checkpoint_bytes(path) / 1e6,
                "bits_per_weight": bpw,
                "formats": ", ".join(f"{k} {v}" for k, v in sorted(report.formats.items())),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    q = quality(models, dense, windows)
    for r in rows:
        r.update(q[r["config"]])
    base = q["dense fp32"]
    for r in rows:
        r["ratio"] = r["perplexity"] / base["perplexity"]
    data = {"threads": args.threads, "windows": args.windows, "embeddings": EMB, "rows": rows}
    write_results(RESULTS, args.name, data, markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
