"""A local Ray instance for the distributed tests (started once per module, stopped after); the tests
that need it are skipped, with the reason, only when Ray is not installed."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'); CI installs it")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
