"""A local Ray instance for the distributed tests (started once per module, stopped after); the tests
that need it are skipped, with the reason, only when Ray is not installed."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'); CI installs it")
    from sparseland.distributed import init_ray

    init_ray(None, num_cpus=2)  # as the executor starts it (workers at the driver's priority, not nice 15)
    try:
        yield ray
    finally:
        ray.shutdown()
