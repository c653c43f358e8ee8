"""Training a sparse dictionary on a cache, and saving/loading it (safetensors + a JSON sidecar).

The loop (Gao et al. 2024's recipe): inputs scaled to E||x||^2 = d, b_dec started at the target
mean, Adam at lr = 2e-4 / sqrt(width / 2^14) unless given, the last 20% of steps decayed linearly
to zero, decoder rows renormalized after every step and their parallel gradient removed before it.
A latent is *dead* for AuxK when it has not fired for ``dead_tokens`` training tokens.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sparseland.config import SparsityConfig
from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic
from sparseland.sae.base import SAE, SAEConfig, build_sae
from sparseland.sae.cache import ActivationCache

SAE_FILE, META_FILE = "sae.safetensors", "sae.json"


@dataclass
class TrainResult:
    tokens: int
    seconds: float
    final_mse: float
    final_l0: float
    dead_in_training: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def sites_for(config: SAEConfig, site: str | None, cache: ActivationCache) -> tuple[str, str]:
    """(input site, output site): a transcoder maps mlp_in to mlp_out; an SAE reads and writes one site."""
    if config.transcoder:
        pair = ("mlp_in", "mlp_out")
        missing = [s for s in pair if s not in cache.sites]
        if missing:
            raise SparselandError(
                f"a transcoder needs sites mlp_in and mlp_out in the cache; {cache.path} has {cache.sites}: "
                "harvest with --site mlp_in,mlp_out"
            )
        return pair
    site = site or cache.sites[0]
    if site not in cache.sites:
        raise SparselandError(f"site {site!r} is not in cache {cache.path} (it has {cache.sites})")
    return site, site


def train_sae(
    cache: ActivationCache,
    config: SAEConfig,
    *,
    tokens: int | None = None,
    batch_size: int = 4096,
    lr: float | None = None,
    site: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SAE, TrainResult]:
    """Train ``config`` on the cache's train split for ``tokens`` tokens (default: one pass)."""
    split = cache.split("train")
    in_site, out_site = sites_for(config, site, cache)
    sites = (in_site,) if in_site == out_site else (in_site, out_site)
    tokens = tokens or split.n_tokens
    if batch_size > split.n_tokens:
        raise SparselandError(f"batch_size={batch_size} exceeds the cache's {split.n_tokens} training tokens")
    torch.manual_seed(seed)
    sae = build_sae(config, cache.d_model, cache.d_model, seed=seed)
    first = next(split.iter_shuffled(sites, min(16384, split.n_tokens), seed=seed + 1))
    sae.set_scales(first[0], first[-1])
    sae.init_from_data(first[0] / sae.scale_in, first[-1] / sae.scale_out)
    lr = lr or 2e-4 / math.sqrt(config.width / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    steps = max(1, tokens // batch_size)
    decay_from = int(steps * 0.8)
    dead_tokens = getattr(config, "dead_tokens", 1_000_000)
    since_fired = torch.zeros(sae.width, dtype=torch.long)
    bar = tqdm(total=steps * batch_size, desc=f"train {config.arch}", unit="tok", unit_scale=True, disable=not progress)
    t0 = time.perf_counter()
    step, epoch, info = 0, 0, {"mse": float("nan"), "l0": float("nan")}
    sae.train()
    if getattr(sae, "gradient_free", False):  # ITDA: built from the batches, no optimizer

        def _batches():
            for batch in split.iter_shuffled(sites, batch_size, seed=seed + 100, max_rows=steps * batch_size):
                bar.update(batch_size)
                yield batch[0] / sae.scale_in, batch[-1] / sae.scale_out

        sae.fit(_batches())
        step = steps
    while step < steps:
        for batch in split.iter_shuffled(sites, batch_size, seed=seed + 100 + epoch):
            if step >= steps:
                break
            x_n, y_n = batch[0] / sae.scale_in, batch[-1] / sae.scale_out
            if step >= decay_from:
                for g in opt.param_groups:
                    g["lr"] = lr * (steps - step) / max(1, steps - decay_from)
            loss, info = sae.loss_n(x_n, y_n, since_fired >= dead_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.before_step()
            opt.step()
            sae.after_step()
            since_fired += batch_size
            since_fired[info["fired"]] = 0
            step += 1
            bar.update(batch_size)
            if step % 10 == 0 or step == steps:
                bar.set_postfix(mse=f"{info['mse']:.4f}", l0=f"{info['l0']:.1f}", refresh=False)
        epoch += 1
    bar.close()
    calib = split.iter_shuffled(sites, batch_size, seed=seed + 7, max_rows=32 * batch_size)
    sae.after_training((b[0] / sae.scale_in, b[-1] / sae.scale_out) for b in calib)
    sae.eval()
    seconds = time.perf_counter() - t0  # includes the after-training calibration
    dead_frac = float((since_fired >= min(dead_tokens, steps * batch_size)).float().mean())
    return sae, TrainResult(steps * batch_size, seconds, info["mse"], info["l0"], dead_frac)


def save_sae(sae: SAE, out: str | Path, meta: dict) -> Path:
    """Write ``sae.safetensors`` and ``sae.json`` into ``out`` (each to a temporary name, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=SAE_FILE + ".tmp-", dir=out)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, tmp)
        os.replace(tmp, out / SAE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    full = {"config": sae.config.to_dict(), "d_in": sae.d_in, "d_out": sae.d_out, **meta}
    write_text_atomic(out / META_FILE, json.dumps(full, indent=2))
    return out


def load_sae(path: str | Path) -> tuple[SAE, dict]:
    path = Path(path).expanduser()
    if not (path / META_FILE).is_file() or not (path / SAE_FILE).is_file():
        raise SparselandError(
            f"{path} holds no trained SAE ({META_FILE} + {SAE_FILE}); train one with `sparseland sae train`"
        )
    meta = json.loads((path / META_FILE).read_text())
    config = SparsityConfig.from_dict(meta["config"])
    sae = build_sae(config, meta["d_in"], meta["d_out"])
    sae.load_state_dict(load_file(path / SAE_FILE))
    return sae.eval(), meta
