"""Distributed calibration: the calibration windows split across Ray workers for out-of-core pruning.

Each worker is a Ray actor wrapping ``weights.offload.BlockWorker``: it holds its share of the windows
(their activations in its own disk buffer), receives each decoder block from the driver, and for each
group of Linears fed by one input returns the per-Linear statistics of its share (Wanda's sums of
squares, SparseGPT's Gram matrices X^T X). They are sums, so the driver adds the workers' parts, prunes
the group, and sends the pruned weights back before the next group's statistics are taken (the same
"true sequential" order as one process). At the end of a block each worker runs the pruned block over
its share to make the next block's inputs. The checkpoint and resume work as in ``prune_offload``.

The workers' activation buffers are directories under the output's work directory, so on a cluster of
several machines that directory must be on a shared filesystem (or each node sees its own copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseland.errors import SparselandError


def make_workers(num_workers: int, hf_config_dict: dict[str, Any], work: Path, gram: bool, cpus_per_worker: float):
    """``num_workers`` Ray actors, each a ``BlockWorker`` with its own buffer directory."""
    from sparseland.distributed import require_ray
    from sparseland.weights.offload import BlockWorker

    ray = require_ray()
    actor = ray.remote(num_cpus=cpus_per_worker)(BlockWorker)
    return [actor.remote(hf_config_dict, str(work / "acts" / f"w{k}"), gram) for k in range(num_workers)]


def prune_distributed(
    model_dir: str | Path,
    config,
    out_dir: str | Path,
    calibration,
    *,
    num_workers: int = 2,
    address: str | None = None,
    cpus_per_worker: float = 1,
    **kwargs: Any,
):
    """``prune_offload`` with the calibration statistics computed by ``num_workers`` Ray actors (a local
    Ray instance unless ``address``); returns its ``OffloadReport``."""
    from sparseland.distributed import init_ray
    from sparseland.weights.offload import load_config, prune_offload, work_dir_for

    if not (isinstance(num_workers, int) and num_workers > 0):
        raise SparselandError(f"num_workers={num_workers!r} must be a positive integer")
    ray = init_ray(address, num_cpus=None)
    hf_config = load_config(model_dir)
    cfg = hf_config.to_dict()
    cfg.pop("quantization_config", None)
    work = work_dir_for(Path(out_dir).expanduser())
    workers = make_workers(num_workers, cfg, work, config.needs_hessian, cpus_per_worker)
    try:
        return prune_offload(model_dir, config, out_dir, calibration, workers=workers, **kwargs)
    finally:
        for w in workers:
            ray.kill(w)


__all__ = ["make_workers", "prune_distributed"]
