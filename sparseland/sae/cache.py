"""The activation cache: harvest a site's activations once, read them many times.

Layout of a cache directory::

    manifest.json                  model, layer, sites, d_model, seq_len, text, per split its shards
    train/windows.npy              (n_windows, seq_len) int32 token ids fed to the model
    train/shard-00000.resid.npy    (rows, d_model) float16 activations, one file per site
    train/shard-00000.index.npy    (rows, 2) int32 (window, position) of each row
    eval/...                       the same for the evaluation split (a disjoint text)

Every file is written to a temporary name and renamed, and the manifest is rewritten after each
shard, so a killed harvest resumes at the first shard the manifest does not list. Position 0 of
every window (the attention-sink position, whose residual norm is tens of times the others') and
special tokens are excluded by default. Reads are memory-mapped (``numpy.load(mmap_mode="r")``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic
from sparseland.sae.sites import StopForward, capture, check_site

CACHE_VERSION = 1
SPLITS = ("train", "eval")
TEXTS = ("stdlib", "embedded")
CHARS_PER_TOKEN_GUESS = 6  # generous: code runs ~3-4 chars per token; the text is cut by characters first


def split_tokens_of(tokenizer, text: str, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """The token stream of one split of a text source. ``stdlib``: the standard library sources, train
    and eval split by file (``sparseland.data.stdlib``); ``embedded``: the embedded text's calibration
    (train) or evaluation part; any other value: a UTF-8 file, first 75% train, last 25% eval."""
    from sparseland.data.text import load_corpus, tokenize_text

    if split not in SPLITS:
        raise SparselandError(f"split {split!r} is not one of {SPLITS}")
    if text == "stdlib":
        from sparseland.data.stdlib import stdlib_text

        max_chars = None if max_tokens is None else max_tokens * CHARS_PER_TOKEN_GUESS
        text_part = stdlib_text(split, max_chars)
        ids = tokenize_text(tokenizer, text_part)
        while max_chars is not None and len(ids) < max_tokens:  # cut at file boundaries: widen until enough
            max_chars *= 4
            wider = stdlib_text(split, max_chars)
            if len(wider) == len(text_part):
                break  # the split is exhausted
            text_part, ids = wider, tokenize_text(tokenizer, wider)
    else:
        corpus = load_corpus(tokenizer, None if text == "embedded" else text)
        ids = corpus.calib if split == "train" else corpus.eval
    return ids if max_tokens is None else ids[:max_tokens]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_mask(windows: torch.Tensor, special_ids: set[int], exclude_first: bool = True) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose activations are cached (not position 0, not special tokens)."""
    keep = torch.ones_like(windows, dtype=torch.bool)
    if exclude_first:
        keep[:, 0] = False
    for sid in special_ids:
        keep &= windows != sid
    return keep


@dataclass
class HarvestStats:
    tokens: int
    seconds: float
    shards: int
    resumed_shards: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _manifest_base(model_name, layer, sites, d_model, seq_len, text, exclude_first) -> dict:
    return {
        "version": CACHE_VERSION,
        "model": model_name,
        "layer": layer,
        "sites": list(sites),
        "d_model": d_model,
        "seq_len": seq_len,
        "text": text,
        "dtype": "float16",
        "excluded": ("position 0 and " if exclude_first else "") + "special tokens",
    }


@dataclass
class _Harvest:
    """What every split and shard of one harvest shares."""

    model: torch.nn.Module
    tokenizer: Any
    layer: int
    sites: tuple[str, ...]
    text: str
    seq_len: int
    batch_size: int
    shard_windows: int
    exclude_first: bool
    special: set[int]
    manifest_path: Path
    manifest: dict
    progress: bool
    token_fn: Any
    new_shards: int = 0  # shards written by this call (``kill_after_shards`` counts these)

    def save_manifest(self) -> None:
        write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=2))


def _open_manifest(out: Path, base: dict) -> dict:
    """The cache's manifest: the existing one (its settings must be ``base``'s: a resume) or a new one."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return {**base, "splits": {}}
    manifest = json.loads(manifest_path.read_text())
    old = {k: manifest.get(k) for k in base}
    if old != base:
        diff = {k: (old[k], base[k]) for k in base if old[k] != base[k]}
        raise SparselandError(
            f"cache {out} was harvested with other settings {diff} (cached, asked); "
            "pass a new --out or the same settings to resume"
        )
    return manifest


def _split_windows(job: _Harvest, split: str, want: int, sdir: Path) -> tuple[dict, torch.Tensor]:
    """``(the split's manifest entry, its windows)``; the windows are cut and saved on the first run
    (or when the split's target changed)."""
    info = job.manifest["splits"].get(split)
    if info is None or info.get("target_tokens") != want:
        if job.token_fn is not None:
            ids = job.token_fn(split, want * 2)
        else:
            ids = split_tokens_of(job.tokenizer, job.text, split, max_tokens=want * 2)
        # each window caches at most seq_len - 1 tokens; take enough windows for `want` rows
        seq_len = job.seq_len
        n_windows = min(len(ids) // seq_len, math.ceil(want / (seq_len - 1)))
        if n_windows == 0:
            raise SparselandError(f"text {job.text!r} ({split}) has fewer than seq_len={seq_len} tokens")
        windows = ids[: n_windows * seq_len].view(n_windows, seq_len).to(torch.int32)
        _save_npy_atomic(sdir / "windows.npy", windows.numpy())
        info = {"target_tokens": want, "windows": n_windows, "shards": [], "tokens": 0, "complete": False}
        job.manifest["splits"][split] = info
        job.save_manifest()
    return info, torch.from_numpy(np.load(sdir / "windows.npy")).long()


def _shard_activations(job: _Harvest, w: torch.Tensor, s: int, bar) -> tuple[dict[str, list], list]:
    """The kept activations of each site over the windows ``w`` of shard ``s``, and their (window,
    position) index."""
    acts: dict[str, list[torch.Tensor]] = {site: [] for site in job.sites}
    index = []
    for b in range(0, len(w), job.batch_size):
        wb = w[b : b + job.batch_size]
        keep = keep_mask(wb, job.special, job.exclude_first)
        with (
            torch.inference_mode(),
            capture(job.model, job.layer, job.sites) as store,
            contextlib.suppress(StopForward),
        ):
            job.model(input_ids=wb)
        for site in job.sites:
            acts[site].append(store[site][keep].to(torch.float16))
        wi, pos = keep.nonzero(as_tuple=True)
        index.append(torch.stack([wi + s * job.shard_windows + b, pos], 1).to(torch.int32))
        bar.update(int(keep.sum()))
    return acts, index


def _write_shard(job: _Harvest, sdir: Path, s: int, acts: dict[str, list], index: list) -> tuple[str, int]:
    """Save shard ``s``'s float16 activations (one file per site) and its index; ``(stem, rows)``."""
    stem = f"shard-{s:05d}"
    rows = 0
    for site in job.sites:
        a = torch.cat(acts[site]).numpy()
        if not np.isfinite(a).all():
            raise SparselandError(
                f"{site} activations of layer {job.layer} overflow float16 in shard {s}; "
                "this cache stores float16 only, pick another layer or site"
            )
        _save_npy_atomic(sdir / f"{stem}.{site}.npy", a)
        rows = len(a)
    _save_npy_atomic(sdir / f"{stem}.index.npy", torch.cat(index).numpy())
    return stem, rows


def _harvest_split(job: _Harvest, out: Path, split: str, want: int, kill_after_shards) -> HarvestStats | None:
    """Harvest the missing shards of ``split``; None when stopped by ``kill_after_shards``."""
    sdir = out / split
    sdir.mkdir(parents=True, exist_ok=True)
    info, windows = _split_windows(job, split, want, sdir)
    n_shards = math.ceil(len(windows) / job.shard_windows)
    done = len(info["shards"])
    t0 = time.perf_counter()
    new_tokens = 0
    bar = tqdm(
        total=int(keep_mask(windows, job.special, job.exclude_first).sum()),
        initial=info["tokens"],
        desc=f"harvest {split}",
        unit="tok",
        unit_scale=True,
        disable=not job.progress,
    )
    for s in range(done, n_shards):
        if kill_after_shards is not None and job.new_shards >= kill_after_shards:
            bar.close()
            return None
        w = windows[s * job.shard_windows : (s + 1) * job.shard_windows]
        acts, index = _shard_activations(job, w, s, bar)
        stem, rows = _write_shard(job, sdir, s, acts, index)
        info["shards"].append({"stem": stem, "rows": rows})
        info["tokens"] += rows
        info["complete"] = s == n_shards - 1
        job.save_manifest()
        new_tokens += rows
        job.new_shards += 1
    bar.close()
    info["complete"] = True
    job.save_manifest()
    return HarvestStats(new_tokens, time.perf_counter() - t0, n_shards, done)


def harvest(
    model: torch.nn.Module,
    tokenizer,
    out: str | Path,
    *,
    model_name: str,
    layer: int,
    sites: tuple[str, ...] = ("resid",),
    text: str = "stdlib",
    tokens: int = 1_000_000,
    eval_tokens: int = 65_536,
    seq_len: int = 256,
    batch_size: int = 8,
    shard_windows: int = 64,
    exclude_first: bool = True,
    progress: bool = True,
    kill_after_shards: int | None = None,
    token_fn=None,
) -> dict[str, HarvestStats]:
    """Run ``model`` over ``tokens`` training tokens and ``eval_tokens`` evaluation tokens of ``text`` in
    windows of ``seq_len``, writing ``sites`` of block ``layer`` to the cache at ``out`` (resumes a cache
    with the same settings). ``kill_after_shards`` stops after that many new shards (for tests);
    ``token_fn(split, max_tokens)`` replaces the text source (for tests)."""
    sites = tuple(sites)
    for site in sites:
        check_site(model, layer, site)
    if seq_len < 2:
        raise SparselandError(f"seq_len={seq_len} must be at least 2 (position 0 is not cached)")
    out = Path(out)
    d_model = model.config.hidden_size
    base = _manifest_base(model_name, layer, sites, d_model, seq_len, text, exclude_first)
    manifest = _open_manifest(out, base)
    special = set(tokenizer.all_special_ids or [])
    job = _Harvest(
        model, tokenizer, layer, sites, text, seq_len, batch_size, shard_windows, exclude_first, special,
        out / "manifest.json", manifest, progress, token_fn,
    )  # fmt: skip
    stats = {}
    for split, want in (("train", tokens), ("eval", eval_tokens)):
        if want <= 0:
            continue
        result = _harvest_split(job, out, split, want, kill_after_shards)
        if result is None:
            return stats
        stats[split] = result
    return stats


class CacheSplit:
    """One split of a cache: memory-mapped shards of each site."""

    def __init__(self, root: Path, manifest: dict, split: str):
        self.root, self.manifest, self.split = root, manifest, split
        info = manifest["splits"].get(split)
        if info is None or not info["shards"]:
            raise SparselandError(f"cache {root} has no {split} split; run `sparseland sae harvest` into it")
        self.shards = [s["stem"] for s in info["shards"]]
        self.rows = [s["rows"] for s in info["shards"]]
        self.n_tokens = sum(self.rows)
        self.complete = bool(info.get("complete"))

    @property
    def dir(self) -> Path:
        return self.root / self.split

    def shard(self, i: int, site: str) -> np.ndarray:
        if site not in self.manifest["sites"]:
            raise SparselandError(f"cache {self.root} holds sites {self.manifest['sites']}, not {site!r}")
        return np.load(self.dir / f"{self.shards[i]}.{site}.npy", mmap_mode="r")

    def index(self, i: int) -> np.ndarray:
        return np.load(self.dir / f"{self.shards[i]}.index.npy", mmap_mode="r")

    def windows(self) -> np.ndarray:
        return np.load(self.dir / "windows.npy", mmap_mode="r")

    def iter_rows(self, sites: tuple[str, ...], batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches in cache order, float32, one tensor per site (for evaluation)."""
        for i in range(len(self.shards)):
            arrays = [self.shard(i, s) for s in sites]
            for b in range(0, self.rows[i], batch_size):
                yield tuple(torch.from_numpy(np.asarray(a[b : b + batch_size], dtype=np.float32)) for a in arrays)

    def iter_shuffled(
        self, sites: tuple[str, ...], batch_size: int, seed: int, mix: int = 8, max_rows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Training batches: shards in a seeded random order, ``mix`` shards at a time loaded and their
        rows shuffled together (neighbouring tokens are correlated; one shard alone mixes too little)."""
        gen = np.random.default_rng(seed)
        order = gen.permutation(len(self.shards))
        yielded = 0
        for g in range(0, len(order), mix):
            group = order[g : g + mix]
            arrays = [np.concatenate([np.asarray(self.shard(i, s)) for i in group]) for s in sites]
            perm = gen.permutation(len(arrays[0]))
            for b in range(0, len(perm) - batch_size + 1, batch_size):
                if max_rows is not None and yielded >= max_rows:
                    return
                idx = np.sort(perm[b : b + batch_size])
                yield tuple(torch.from_numpy(a[idx].astype(np.float32)) for a in arrays)
                yielded += batch_size


class ActivationCache:
    """A harvested cache directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise SparselandError(
                f"{self.path} is not an activation cache (no manifest.json); create one with `sparseland sae harvest`"
            )
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("version", 0) > CACHE_VERSION:
            raise SparselandError(f"cache {self.path} is newer than this sparseland; upgrade sparseland")

    def split(self, name: str) -> CacheSplit:
        return CacheSplit(self.path, self.manifest, name)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])
