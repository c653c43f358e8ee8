"""A sweep: architectures x k on one cache, each run in its own directory, resumable (a run with an
``eval.json`` is done and skipped), then the report."""

from __future__ import annotations

import json
from pathlib import Path

from sparseland.io import write_text_atomic
from sparseland.sae.base import SAEConfig
from sparseland.sae.cache import ActivationCache
from sparseland.sae.evaluate import evaluate_sae
from sparseland.sae.report import write_report
from sparseland.sae.train import load_sae, save_sae, sites_for, train_sae


def run_sweep(
    cache: ActivationCache,
    configs: dict[str, SAEConfig],
    out: str | Path,
    *,
    tokens: int | None = None,
    batch_size: int = 4096,
    model=None,
    tokenizer=None,
    ce_windows: int = 8,
    ce_text: str = "embedded",
    seq_len: int = 256,
    progress: bool = True,
) -> list[dict]:
    """Train and evaluate every ``name -> config`` into ``out/name``; returns the rows of the report."""
    out = Path(out)
    rows = []
    for name, config in configs.items():
        run_dir = out / name
        done = run_dir / "eval.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        in_site, out_site = sites_for(config, None, cache)
        meta = {
            "cache": str(cache.path.resolve()),
            "model": cache.manifest["model"],
            "layer": cache.layer,
            "in_site": in_site,
            "out_site": out_site,
        }
        if (run_dir / "sae.json").is_file():
            sae, meta = load_sae(run_dir)
        else:
            sae, res = train_sae(cache, config, tokens=tokens, batch_size=batch_size, progress=progress)
            meta["train"] = res.to_dict()
            save_sae(sae, run_dir, meta)
        ev = evaluate_sae(
            sae,
            meta,
            cache.split("eval"),
            model=model,
            tokenizer=tokenizer,
            ce_windows=ce_windows,
            ce_text=ce_text,
            seq_len=seq_len,
            progress=progress,
        )
        row = {
            "name": name,
            "arch": config.arch,
            "transcoder": config.transcoder,
            "width": config.width,
            "k": getattr(config, "k", None),
            "train": meta.get("train"),
            **ev,
        }
        write_text_atomic(done, json.dumps(row, indent=2))
        rows.append(row)
    write_report(rows, out, title=f"SAE sweep on {cache.path.name} (layer {cache.layer})")
    return rows
