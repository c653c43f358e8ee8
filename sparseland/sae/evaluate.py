"""Evaluating a trained dictionary: FVU, realised L0 and dead latents on the cache's evaluation split,
and delta CE / KL / CE recovered from splicing it into the model on an evaluation text."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from sparseland.sae.base import SAE
from sparseland.sae.cache import CacheSplit, split_tokens_of
from sparseland.sae.metrics import FVUAccumulator, SparsityAccumulator, splice_metrics, split_mean


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, split: CacheSplit, in_site: str, out_site: str, batch_size: int = 4096, progress: bool = False
) -> dict:
    """FVU (eval-split mean, float64, original scale), realised L0, dead fraction over the split's N tokens."""
    mean = split_mean((b[0] for b in split.iter_rows((out_site,), batch_size)), split.manifest["d_model"])
    sites = (in_site,) if in_site == out_site else (in_site, out_site)
    fvu = FVUAccumulator(mean)
    sp = SparsityAccumulator(sae.width)
    bar = tqdm(total=split.n_tokens, desc="eval fvu", unit="tok", unit_scale=True, disable=not progress, leave=False)
    for batch in split.iter_rows(sites, batch_size):
        z = sae.encode(batch[0])
        fvu.update(batch[-1], sae.decode(z))
        sp.update(z)
        bar.update(len(batch[0]))
    bar.close()
    return {
        "fvu": fvu.fvu,
        "l0": sp.l0,
        "dead_fraction": sp.dead_fraction,
        "dead_over_tokens": sp.n,
        "eval_tokens": fvu.n,
        "mean": mean,
    }


def evaluate_sae(
    sae: SAE,
    meta: dict,
    split: CacheSplit,
    model=None,
    tokenizer=None,
    ce_text: str = "embedded",
    ce_windows: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """All metrics as one dict (the keys of ``sparseland sae eval --json``). Without ``model`` the
    splice metrics are skipped (``None``)."""
    t0 = time.perf_counter()
    in_site, out_site = meta["in_site"], meta["out_site"]
    rec = reconstruction_metrics(sae, split, in_site, out_site, progress=progress)
    mean = rec.pop("mean")
    out = {**rec, "delta_ce_nats": None, "kl_nats": None, "ce_recovered": None}
    if model is not None:
        from sparseland.data.text import eval_windows

        ids = split_tokens_of(tokenizer, ce_text, "eval", max_tokens=ce_windows * seq_len * 2)
        windows = eval_windows(ids, seq_len, ce_windows)
        bar = tqdm(
            total=windows.numel(), desc="eval splice", unit="tok", unit_scale=True, disable=not progress, leave=False
        )
        with torch.no_grad():
            res = splice_metrics(
                model,
                windows,
                meta["layer"],
                out_site,
                sae,
                mean,
                source_site=in_site,
                batch_size=batch_size,
                progress=bar.update,
            )
        bar.close()
        out.update(res.to_dict())
        out["ce_text"] = f"{ce_text} (eval part), {len(windows)} x {seq_len} tokens"
    out["seconds"] = time.perf_counter() - t0
    return out
