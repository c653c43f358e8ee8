"""Why int4-g32 costs more than llama.cpp's Q4_1 on the same weights: the offset term.

    python benchmarks/ablate_q4_offset.py [--windows 4]   -> benchmarks/results/q4_offset_ablation.{md,json}

Both engines round x to int8 per block of 32 (scale max|x|/127). For an asymmetric 4-bit row
(W = d q + m per group), llama.cpp's Q4_1 x Q8_1 takes the offset term from the rounded x's sum
(Q8_1's s), so it computes W @ x_rounded: error sum W (x - x_rounded). The q4 kernel took it from the
exact float sum of x: error sum (W - m)(x - x_rounded), with W - m = d q >= 0 about twice |W|.

Simulated on the dense float32 embedded model, whose weights are exactly the int4-g32 grid (asserted):
hooks on every decoder Linear round its input the kernels' way and, for "exact-x offset", add
m * (sum x - sum x_rounded) per group. Scored as llama-perplexity scores (the second half of each
512-token window): perplexity ratio, KL(float || variant) and top-1 agreement against the float model.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sparseland as sl
from sparseland.io import write_results
from sparseland.quant.scheme import quantize_rtn


def xround(x: torch.Tensor) -> torch.Tensor:
    sh = x.shape
    xb = x.reshape(-1, sh[-1] // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax != 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(sh)


def grid_offsets(model) -> dict[str, torch.Tensor]:
    """Each Linear's int4-g32 group offsets (the model's weights are checked to be that grid exactly)."""
    mins = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            qw = quantize_rtn(m.weight.data, "int4-g32")
            assert torch.equal(qw.dequantize(), m.weight.data), name  # the model's weights are the grid
            mins[name] = qw.offset.float()  # (out, in/32)
    return mins


def set_mode(model, mins: dict[str, torch.Tensor], hooks: list, mode: str) -> None:
    """Hook the Linears to see the rounded x ("float": no hooks); "exact-x offset" adds back the offset
    term of the rounding error, sum(x - xq) * offset, per group."""
    for h in hooks:
        h.remove()
    hooks.clear()
    if mode == "float":
        return
    for name, m in model.named_modules():
        if name not in mins:
            continue

        def pre(mod, a):
            xr = xround(a[0])
            mod._sl_dx = a[0] - xr if mode == "exact-x offset" else None
            return (xr,)

        def post(mod, a, y, name=name):
            if mod._sl_dx is None:
                return y
            s = mod._sl_dx.reshape(*mod._sl_dx.shape[:-1], -1, 32).sum(-1)  # (..., G)
            return y + s @ mins[name].T

        hooks.extend([m.register_forward_pre_hook(pre), m.register_forward_hook(post)])


def logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [F.log_softmax(model(input_ids=windows[i : i + 1]).logits[:, :-1].float(), -1) for i in range(len(windows))]
        )


def compare(base, lp: torch.Tensor, tgt: torch.Tensor, half: int) -> tuple[dict, torch.Tensor]:
    """``(row, nll)``: PPL ratio, mean KL and top-1 agreement of ``lp`` against ``base = (lp, nll)``
    (None: ``lp`` is the base) over the predictions from ``half`` on."""
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[:, half:]
    base = base or (lp, nll)
    kl = (base[0].exp() * (base[0] - lp)).sum(-1)[:, half:]
    top = (base[0].argmax(-1) == lp.argmax(-1))[:, half:].float().mean()
    ratio = float((nll.mean() - base[1].mean()).exp())
    return {"ppl_ratio": ratio, "kld_mean": float(kl.mean()), "same_top": float(top)}, nll


def runtime_row(model, windows, base, tgt, half: int) -> dict:
    """The runtime itself: the model quantized to int4-g32 (the same grid) on the Q4 kernels, which take
    the offset term from the rounded x's sums (as llama.cpp does)."""
    import copy

    t0 = time.perf_counter()
    qmodel = copy.deepcopy(model)
    sl.sparsify_(qmodel, sl.QuantConfig(scheme="int4-g32"))
    sl.to_sparse_runtime_(qmodel, format="auto")
    formats = {type(m.weight_format).__name__ for m in qmodel.modules() if hasattr(m, "weight_format")}
    row, _ = compare(base, logprobs(qmodel, windows), tgt, half)
    return {"variant": f"runtime kernels ({', '.join(sorted(formats))})", **row, "seconds": time.perf_counter() - t0}


def write(rows: list[dict], windows: int) -> None:
    cmd = f"python benchmarks/ablate_q4_offset.py --windows {windows}"
    md = [
        f"# int4-g32 x int8-x: the offset term\n\nCommand: `{cmd}`\n",
        "| variant | PPL ratio | KL mean | same top-1 |",
    ]
    md += ["|---|---:|---:|---:|"] + [
        f"| {r['variant']} | {r['ppl_ratio']:.4f} | {r['kld_mean']:.5f} | {r['same_top']:.4f} |" for r in rows
    ]
    write_results("benchmarks/results", "q4_offset_ablation", {"command": cmd, "rows": rows}, "\n".join(md) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = sl.load_model("smollm2-135m")
    model.eval()
    windows = sl.load_corpus(tok).evaluation(seq_len=512, max_windows=args.windows)
    mins = grid_offsets(model)
    hooks: list = []
    half = windows.shape[1] // 2 - 1  # predictions of positions T/2 .. T-2, as llama-perplexity
    tgt = windows[:, 1:]
    rows, base = [], None
    for mode in ("float", "W @ x_rounded (llama.cpp Q4_1 x Q8_1)", "exact-x offset"):
        t0 = time.perf_counter()
        set_mode(model, mins, hooks, mode)
        lp = logprobs(model, windows)
        row, nll = compare(base, lp, tgt, half)
        base = base or (lp, nll)
        rows.append({"variant": mode, **row, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    set_mode(model, mins, hooks, "float")
    rows.append(runtime_row(model, windows, base, tgt, half))
    print(rows[-1], flush=True)
    write(rows, args.windows)


if __name__ == "__main__":
    main()
