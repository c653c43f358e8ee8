"""Readable results: FVU-vs-L0 and delta-CE-vs-L0 plots per architecture (PNG + an HTML/Markdown
report), and a small HTML feature browser: per latent, its top-activating contexts from the
evaluation text with the token highlighted, and the top logits of its decoder direction."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from sparseland.io import write_text_atomic
from sparseland.sae.base import SAE
from sparseland.sae.cache import CacheSplit


def _plot(rows: list[dict], key: str, ylabel: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get(key) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for arch in sorted({r["label_arch"] for r in pts}):
        rs = sorted((r for r in pts if r["label_arch"] == arch), key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rs], [r[key] for r in rs], marker="o", label=arch)
    ax.set_xscale("log")
    ax.set_xlabel("realised L0 (active latents per token, at inference)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(rows: list[dict], out: str | Path, title: str = "SAE sweep") -> Path:
    """``report.html``, ``report.md``, ``report.json`` and the two plots in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["label_arch"] = r["arch"] + (" transcoder" if r.get("transcoder") else "")
    plots = [
        _plot(rows, "fvu", "FVU (eval split)", out / "fvu_vs_l0.png"),
        _plot(rows, "delta_ce_nats", "delta CE (nats)", out / "dce_vs_l0.png"),
    ]
    cols = [
        "name",
        "label_arch",
        "width",
        "k",
        "l0",
        "fvu",
        "dead_fraction",
        "delta_ce_nats",
        "kl_nats",
        "ce_recovered",
    ]

    def fmt(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    md = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    imgs = "".join(f'<img src="{p.name}" alt="{p.stem}">' for p in plots if p is not None)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{margin:1em;border:1px solid #eee}}</style>
</head><body><h1>{html.escape(title)}</h1><div>{imgs}</div><table><tr>{head}</tr>{body}</table>
<p>FVU on the cache's evaluation split (its own per-dimension mean, float64, original scale); L0 realised at
inference; delta CE with the reconstruction spliced into the forward pass.</p></body></html>"""
    write_text_atomic(out / "report.html", page)
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    write_text_atomic(out / "report.json", json.dumps(rows, indent=2))
    return out / "report.html"


@torch.no_grad()
def top_activations(sae: SAE, split: CacheSplit, site: str, top: int = 8, batch_size: int = 2048):
    """``(values (top, m), rows (top, m), fired (m,))``: each latent's largest activations on the split
    and the global row numbers where they occur."""
    vals = torch.full((top, sae.width), -1.0)
    rows = torch.zeros((top, sae.width), dtype=torch.long)
    fired = torch.zeros(sae.width, dtype=torch.long)
    start = 0
    for (x,) in split.iter_rows((site,), batch_size):
        z = sae.encode(x)
        fired += (z > 0).sum(0)
        r = torch.arange(start, start + len(x)).unsqueeze(1).expand_as(z)
        allv, allr = torch.cat([vals, z]), torch.cat([rows, r])
        vals, pick = allv.topk(top, dim=0)
        rows = allr.gather(0, pick)
        start += len(x)
    return vals, rows, fired


def decoder_logits(sae: SAE, model, top: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Top logits of each decoder direction through the final norm's gain and the unembedding."""
    w_u = model.get_output_embeddings().weight  # (V, d)
    gain = getattr(getattr(model.model, "norm", None), "weight", None)
    d = sae.W_dec.detach() * (gain.detach() if gain is not None else 1.0)
    logits = d @ w_u.detach().T  # (m, V)
    return logits.topk(top, dim=1)


def feature_browser(
    sae: SAE,
    split: CacheSplit,
    site: str,
    tokenizer,
    model=None,
    n_features: int = 24,
    top: int = 6,
    context: int = 12,
    out: str | Path = "features.html",
) -> Path:
    """An HTML page of the ``n_features`` most frequently firing latents."""
    vals, rows, fired = top_activations(sae, split, site, top)
    order = torch.argsort(fired, descending=True)[:n_features]
    index = np.concatenate([np.asarray(split.index(i)) for i in range(len(split.shards))])
    windows = np.asarray(split.windows())
    logits = decoder_logits(sae, model) if model is not None else None

    def tok(i: int) -> str:
        return html.escape(tokenizer.decode([int(i)]))

    cards = []
    for j in order.tolist():
        ctxs = []
        for v, r in zip(vals[:, j].tolist(), rows[:, j].tolist(), strict=True):
            if v <= 0:
                continue
            w, p = index[r]
            ids = windows[w, max(0, p - context) : p + 4]
            at = p - max(0, p - context)
            spans = "".join(
                f'<mark title="{v:.3f}">{tok(t)}</mark>' if i == at else f"<span>{tok(t)}</span>"
                for i, t in enumerate(ids)
            )
            ctxs.append(f'<div class="ctx"><b>{v:.2f}</b> <code>{spans}</code></div>')
        lg = ""
        if logits is not None:
            lg = (
                "<div class='lg'>top logits: "
                + ", ".join(
                    f"<code>{tok(t)}</code> {s:.2f}"
                    for s, t in zip(logits[0][j].tolist(), logits[1][j].tolist(), strict=True)
                )
                + "</div>"
            )
        cards.append(
            f'<section id="f{j}"><h3>latent {j} <small>fires on {int(fired[j])} of {split.n_tokens} tokens</small></h3>'
            f"{lg}{''.join(ctxs) or '<i>never fired</i>'}</section>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAE feature browser</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}section{{border-bottom:1px solid #ddd;padding:.5em 0}}
code{{white-space:pre-wrap;background:#f6f6f6}}mark{{background:#ffb347;font-weight:bold}}
.lg{{color:#555;margin:.3em 0}}</style>
</head><body><h1>Feature browser</h1><p>{len(order)} most frequent latents of {sae.width}
({html.escape(sae.config.arch)}); contexts from the evaluation split ({split.n_tokens} tokens), the activating token
highlighted.</p>{"".join(cards)}</body></html>"""
    return write_text_atomic(out, page)
