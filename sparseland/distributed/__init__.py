"""Ray for sparseland: frontier cells as Ray tasks, and distributed calibration for out-of-core pruning.

Ray is an optional extra (``pip install -e ".[ray]"``); nothing here imports it until it is used, and
``require_ray`` turns its absence into a one-line install message.
"""

from __future__ import annotations

import os

from sparseland.errors import SparselandError

INSTALL = 'Ray is not installed; install the extra with `pip install -e ".[ray]"` (or `pip install "ray>=2.9"`)'


def require_ray():
    """The ``ray`` module, or a SparselandError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SparselandError(INSTALL) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to Ray once: ``address`` None or "local" starts a local instance (``num_cpus`` CPUs), "auto"
    joins the cluster started on this machine with ``ray start --head``, HOST:PORT joins that cluster."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address in (None, "", "local"):
            # Ray runs its workers at nice 15 by default; on a shared machine they then get almost no CPU
            # (measured: 5 s of CPU in 5 min at load 10) while the driver only waits on them. Equal priority,
            # unless the user set RAY_worker_niceness. A cluster from `ray start` takes it from its own env.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise SparselandError(
            f"could not connect to the Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
            "and pass --address auto, or pass the head's HOST:PORT"
        ) from exc
    return ray


__all__ = ["INSTALL", "SparselandError", "init_ray", "require_ray"]
