"""The frontier report: ``report.md`` and a self-contained ``report.html`` (plots embedded as base64).

Everything is computed from stored results (``store.ResultStore``), so ``sparseland report DIR``
re-renders without touching the model. Plots: perplexity vs sparsity per method (log y), perplexity
vs measured decode speedup over dense (the frontier) and perplexity vs model size. The summary is
plain sentences generated from the numbers: the best method at each sparsity and pattern, how far it
is from dense, and what the measured speed and size gains are.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from sparseland.bench.store import open_store
from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic

PLOTS = {
    "sparsity": "perplexity_vs_sparsity.png",
    "speed": "perplexity_vs_speedup.png",
    "size": "perplexity_vs_size.png",
}
MARKERS = {"dense": "*", "unstructured": "o"}  # N:M patterns get squares, triangles, ...
_NM_MARKERS = ["s", "^", "D", "v", "P"]
Result = dict[str, Any]


def _dense(results: list[Result]) -> Result | None:
    return next((r for r in results if r["cell"]["method"] == "dense"), None)


def _tps(r: Result | None) -> float | None:
    return (r.get("speed") or {}).get("tokens_per_s") if r else None


def speedup(r: Result, dense: Result | None) -> float | None:
    """Decode tokens/s of ``r`` over dense's measured right before it (else the dense cell's), on the
    same decode path: a cell the fused C++ step cannot run is compared with dense on the Python step."""
    a = _tps(r)
    ref = r.get("dense_speed") or (dense or {}).get("speed") or {}
    b = ref.get("tokens_per_s")
    if (r.get("speed") or {}).get("path") == "python" and ref.get("python_tokens_per_s"):
        b = ref["python_tokens_per_s"]
    return a / b if a and b else None


def _num(x: float) -> str:
    """Readable at any scale: 1.23, 25.85, 349.9, 2.15e+07."""
    return f"{x:.2f}" if x < 100 else f"{x:.4g}" if x < 1e6 else f"{x:.3g}"


def _name(r: Result) -> str:
    """The method and its options, e.g. ``wanda`` or ``wanda allocation=owl``."""
    opts = "".join(f" {k}={v}" for k, v in sorted(r["cell"].get("options", {}).items()))
    return r["cell"]["method"] + opts


FAMILY_NAMES = {
    "weights": "Weight sparsity",
    "activations": "Activation sparsity",
    "attention": "Attention sparsity",
    "combined": "Combined sparsity",
    "quant": "Quantization",
}


def _family(r: Result) -> str:
    return r.get("family") or "weights"


def _group(r: Result) -> tuple[str, float]:
    return r["cell"]["pattern"], r["cell"]["sparsity"]


def _group_name(pattern: str, sparsity: float) -> str:
    return f"{sparsity:.0%} unstructured" if pattern == "unstructured" else f"{pattern} ({sparsity:.0%})"


def summary(results: list[Result], n_expected: int | None = None) -> list[str]:
    """Plain-language sentences about the results (one per line, no markup)."""
    dense = _dense(results)
    lines: list[str] = []
    if dense:
        mb = dense["model_bytes"] / 1e6
        tps = f", {_tps(dense):.1f} tokens/s decode" if _tps(dense) else ""
        lines.append(
            f"Dense model: perplexity {dense['perplexity']:.2f} on {dense['eval_windows']} windows, {mb:.0f} MB{tps}."
        )
    groups: dict[tuple[str, str, float], list[Result]] = {}
    for r in results:  # compare within a family: 50% of the weights is not 50% of the attention
        if r["cell"]["method"] != "dense":
            groups.setdefault((_family(r), *_group(r)), []).append(r)
    for (family, pattern, sparsity), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["perplexity"])
        best, rest = rs[0], rs[1:]
        far = f", {_num(best['perplexity'] / dense['perplexity'])}x dense" if dense else ""
        others = "; ".join(f"{_name(r)} {r['perplexity']:.4g}" for r in rest)
        size = f" Its size is {best['model_bytes'] / dense['model_bytes']:.2f}x dense." if dense else ""
        verb = "wins with perplexity" if rest else "has perplexity"
        lines.append(
            f"{FAMILY_NAMES.get(family, family)} at {_group_name(pattern, sparsity)}: {_name(best)} {verb} "
            f"{best['perplexity']:.4g}{far}" + (f" (then {others})." if others else ".") + size
        )
    lines += longctx_summary(results)
    sources = {r.get("bytes_source") for r in results}
    if results:
        how = (
            "the size of sparseland's compressed sparse checkpoint"
            if sources == {"checkpoint"}
            else ("estimated: dense tensors, plus a bitmask and the nonzeros of each sparse Linear weight")
        )
        lines.append(f"Model sizes are {how}.")
    ups = [(speedup(r, dense), r) for r in results if r["cell"]["method"] != "dense"]
    ups = [(s, r) for s, r in ups if s is not None]
    if ups:
        lo, hi = min(ups, key=lambda t: t[0]), max(ups, key=lambda t: t[0])
        engine = (dense or {}).get("speed", {}).get("engine", "")
        lines.append(
            f"Measured decode speedup over dense ranges from {lo[0]:.2f}x ({lo[1]['label']}) to "
            f"{hi[0]:.2f}x ({hi[1]['label']}), with the {engine} decoder."
        )
        if "plain" in engine:
            lines.append(
                "The plain PyTorch decoder multiplies the zeros like any other number, so speedups "
                "near 1.0x are expected here; the sparse runtime is what turns zeros into speed."
            )
    elif results:
        lines.append("Decode speed was not measured (--no-speed).")
    lines += fastest_by_quality(results)
    if n_expected is not None and len(results) < n_expected:
        lines.append(
            f"{n_expected - len(results)} of {n_expected} cells have not finished; rerun the same "
            "`sparseland frontier` command to complete them (finished cells are kept)."
        )
    return lines


QUALITY_LEVELS = (1.01, 1.05, 1.1, 1.25, 1.5, 2.0)  # perplexity over dense


def fastest_by_quality(results: list[Result]) -> list[str]:
    """The plain answer: for each quality level (perplexity at most L x dense), the configuration with the
    fastest measured decode, and how much faster than dense it is; levels that add no new answer are
    skipped."""
    dense = _dense(results)
    if not dense or not _tps(dense):
        return []
    timed = [(r["perplexity"] / dense["perplexity"], _tps(r), r) for r in results if _tps(r)]
    lines, last = [], None
    for level in QUALITY_LEVELS:
        ok = [t for t in timed if t[0] <= level]
        if not ok:
            continue
        ratio, tps, best = max(ok, key=lambda t: t[1])
        if best is last:
            continue
        last = best
        up = speedup(best, dense)
        vs = f", {up:.2f}x dense" if up and best is not dense else ""
        lines.append(
            f"Fastest within {level:g}x dense perplexity: {best['label']} ({tps:.0f} tokens/s{vs}; "
            f"perplexity {ratio:.3f}x dense, {best['model_bytes'] / 1e6:.0f} MB)."
        )
    return lines


def _measured(r: Result) -> str:
    """The measured sparsity; a combination shows each part's (w weights, a activations, s attention)."""
    if r.get("family") != "combined":
        return f"{r['measured_sparsity']:.1%}"
    parts = [("w", r.get("weight_sparsity")), ("a", r.get("activation_sparsity")), ("s", r.get("attention_sparsity"))]
    return " ".join(f"{k} {v:.0%}" for k, v in parts if v is not None)


def _longctx(r: Result) -> float | None:
    return (r.get("longctx") or {}).get("accuracy")


def longctx_summary(results: list[Result]) -> list[str]:
    """Sentences on long-context accuracy: dense's, then each measured cell's difference from it."""
    dense = _dense(results)
    rs = [r for r in results if _longctx(r) is not None and r is not dense]
    if dense is None or _longctx(dense) is None:
        return []
    lc = dense["longctx"]
    line = (
        f"Long-context accuracy ({lc['samples']} needle-retrieval samples at {lc['length']} tokens): dense "
        f"{lc['accuracy']:.0f}%"
    )
    if rs:
        line += "; " + "; ".join(f"{r['label']} {_longctx(r):.0f}% ({_longctx(r) - lc['accuracy']:+.0f})" for r in rs)
    return [line + "."]


def table(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the results table (a long-context column if any cell has one)."""
    dense = _dense(results)
    with_longctx = any(_longctx(r) is not None for r in results)
    head = [
        "method",
        "pattern",
        "sparsity",
        "measured",
        "perplexity",
        "vs dense",
        "KL",
        "top-1",
        "method s",
        "MB",
        "size vs dense",
        "tokens/s",
        "speedup",
        "prefill tok/s",
    ] + (["long-ctx acc"] if with_longctx else [])
    rows = []
    for r in results:
        c, up, tps = r["cell"], speedup(r, dense), _tps(r)
        rows.append(
            [
                _name(r),
                c["pattern"],
                f"{c['sparsity']:.0%}",
                _measured(r),
                _num(r["perplexity"]),
                _num(r["perplexity"] / dense["perplexity"]) + "x" if dense else "-",
                f"{r['kl_mean']:.4f}" if r.get("kl_mean") is not None else "-",  # cells stored before KL: -
                f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "-",
                f"{r['method_seconds']:.1f}",
                f"{r['model_bytes'] / 1e6:.1f}",
                f"{r['model_bytes'] / dense['model_bytes']:.2f}x" if dense else "-",
                f"{tps:.1f}" if tps else "-",
                f"{up:.2f}x" if up else "-",
                f"{pf:.0f}" if (pf := (r.get("speed") or {}).get("prefill_tokens_per_s")) else "-",
            ]
            + ([f"{_longctx(r):.0f}%" if _longctx(r) is not None else "-"] if with_longctx else [])
        )
    return head, rows


def markdown_table(results: list[Result]) -> str:
    head, rows = table(results)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])


def text_table(results: list[Result]) -> str:
    """The results table as aligned plain text, for the terminal."""
    head, rows = table(results)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)) for row in [head, *rows])


def _style(pattern: str, nm_patterns: list[str]) -> str:
    return MARKERS.get(pattern) or _NM_MARKERS[nm_patterns.index(pattern) % len(_NM_MARKERS)]


def plot(results: list[Result], kind: str, path: Path) -> Path:
    """Write one plot (``kind`` in ``PLOTS``) as a PNG; perplexity always on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = _dense(results)
    methods = list(dict.fromkeys(r["cell"]["method"] for r in results if r["cell"]["method"] != "dense"))
    nm_patterns = list(dict.fromkeys(r["cell"]["pattern"] for r in results if r["cell"]["pattern"] not in MARKERS))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    xs = {
        "sparsity": lambda r: 100 * r["cell"]["sparsity"],
        "speed": lambda r: speedup(r, dense),
        "size": lambda r: r["model_bytes"] / 1e6,
    }[kind]
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    for m in methods:
        rs = [r for r in results if r["cell"]["method"] == m and xs(r) is not None]
        for pattern in dict.fromkeys(r["cell"]["pattern"] for r in rs):
            pts = sorted((xs(r), r["perplexity"]) for r in rs if r["cell"]["pattern"] == pattern)
            ls = "-" if kind == "sparsity" and pattern == "unstructured" else "none"
            if ls == "-" and dense is not None:  # unstructured curves start at dense (0%)
                pts = [(0.0, dense["perplexity"]), *pts]
            ax.plot(
                *zip(*pts, strict=False),
                marker=_style(pattern, nm_patterns),
                ls=ls,
                color=colors[m],
                ms=7,
                label=f"{m} ({pattern})",
            )
            if kind != "sparsity":  # several sparsities share a colour and marker: label the points
                for r in rs:
                    if r["cell"]["pattern"] == pattern:
                        ax.annotate(
                            f"{r['cell']['sparsity']:.0%}",
                            (xs(r), r["perplexity"]),
                            fontsize=7,
                            xytext=(4, 3),
                            textcoords="offset points",
                            color=colors[m],
                        )
    if dense is not None:
        ax.axhline(dense["perplexity"], color="k", ls="--", lw=1, label="dense")
        if xs(dense) is not None and kind != "sparsity":
            ax.plot([xs(dense)], [dense["perplexity"]], "k*", ms=12)
    if not any(xs(r) is not None for r in results):
        ax.text(0.5, 0.5, "decode speed not measured", transform=ax.transAxes, ha="center", color="gray")
    if kind == "sparsity":
        ax.set_xlim(-3, 100)
        if dense is not None:
            ax.plot([0], [dense["perplexity"]], "k*", ms=12)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_xlabel(
        {
            "sparsity": "sparsity of the Linear weights (%)",
            "speed": "decode speedup over dense (higher is better)",
            "size": "model size (MB, nonzero-aware)",
        }[kind]
    )
    ax.set_title(
        {
            "sparsity": "Quality vs sparsity",
            "speed": "The frontier: quality vs measured speed",
            "size": "Quality vs model size",
        }[kind]
    )
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(
    results: list[Result],
    out_dir: str | Path,
    settings: dict[str, Any] | None = None,
    n_expected: int | None = None,
) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {k: plot(results, k, out / name) for k, name in PLOTS.items()}
    lines = summary(results, n_expected)
    s = settings or {}
    setup = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
    md = [
        "# sparseland frontier report",
        "",
        f"Settings: {setup}" if setup else "",
        "",
        "## Summary",
        "",
        *[f"- {x}" for x in lines],
        "",
        "## Results",
        "",
        markdown_table(results),
        "",
        "## Plots",
        "",
        *[f"![{k}]({p.name})\n" for k, p in pngs.items()],
    ]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    head, rows = table(results)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in rows)
    imgs = "".join(
        f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for k, p in pngs.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sparseland frontier report</title><style>"
        "body{font-family:sans-serif;max-width:62em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "img{max-width:100%;display:block;margin:1em 0}</style></head><body>"
        f"<h1>sparseland frontier report</h1><p>{html.escape(setup)}</p><h2>Summary</h2><ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in lines)
        + "</ul><h2>Results</h2><table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + f"</tr>{cells}</table><h2>Plots</h2>{imgs}</body></html>\n"
    )
    write_text_atomic(out / "report.html", page)
    return {"md": out / "report.md", "html": out / "report.html", **pngs}


def render_from_store(out_dir: str | Path) -> tuple[list[Result], dict[str, Path], list[str]]:
    """Re-render the report of the last run stored in ``out_dir``: ``(results, paths, summary)``."""
    with open_store(out_dir, must_exist=True) as store:
        keys = store.get_meta("grid")
        settings = store.get_meta("settings", {})
        results = store.results(keys) if keys is not None else store.results()
    if not results:
        raise SparselandError(
            f"{out_dir} has no finished frontier cells yet; run `sparseland frontier --out {out_dir}`"
        )
    n = len(keys) if keys is not None else None
    return results, write_report(results, out_dir, settings, n), summary(results, n)
