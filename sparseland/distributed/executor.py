"""Frontier cells as Ray tasks (``sparseland frontier --executor ray``).

Each missing cell becomes one Ray task that declares its CPU needs (``cpus_per_cell``), loads the
workload itself (the model named in the settings: every worker needs the model files, or the embedded
model's package, installed) and returns the cell's result record. The driver gathers results as they
finish and is the only writer of the SQLite store, so resume, versioning and the report are those of a
local run. A task whose worker process dies (killed, out of memory, a lost node) is retried by Ray
(``max_retries``); a cell that raises an ordinary error fails the sweep as it would locally, with the
cells finished so far already stored.

Speed: cells measured at the same time on one machine share its cores, so their tokens/s are lower
and noisier than a local run's (each cell's speedup is still dense and the cell timed alternately in
the same task); pass ``--no-speed`` when only perplexities are wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sparseland.errors import SparselandError


def _run_one(cell_dict: dict, settings, measure_speed, workload_fn) -> dict[str, Any]:
    """One cell in a Ray worker: load the workload, measure the cell (the same code as a local run)."""
    import torch

    from sparseland.bench import frontier as fr

    torch.set_num_threads(max(1, int(_cpus())))
    cell = fr.Cell(**cell_dict)
    workload = (workload_fn or fr.load_workload)(settings)
    return fr.run_cell(workload.model.eval(), cell, workload, settings, measure_speed)


def _cpus() -> float:
    import ray

    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001  (older Ray: no assigned-resources API; one thread is safe)
        return 1


def run_cells_ray(
    todo: Sequence[tuple[str, Any]],
    settings,
    measure_speed=None,
    workload_fn: Callable | None = None,
    *,
    address: str | None = None,
    cpus_per_cell: float = 1,
    max_retries: int = 2,
) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Yield ``(key, cell, result)`` for each of ``todo`` (pairs of key and cell) as its Ray task finishes."""
    from sparseland.distributed import init_ray

    if not cpus_per_cell > 0:
        raise SparselandError(f"cpus_per_cell={cpus_per_cell!r} must be positive")
    ray = init_ray(address)
    task = ray.remote(num_cpus=cpus_per_cell, max_retries=max_retries, retry_exceptions=False)(_run_one)
    settings_ref = ray.put(settings)
    pending = {task.remote(cell.to_dict(), settings_ref, measure_speed, workload_fn): (key, cell) for key, cell in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                key, cell = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise exc.as_instanceof_cause() from None
                except ray.exceptions.WorkerCrashedError as exc:
                    raise SparselandError(
                        f"cell {cell.label!r}: its Ray worker died {max_retries + 1} times; see the Ray logs "
                        "(out of memory?)"
                    ) from exc
                yield key, cell, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


__all__ = ["run_cells_ray"]
