"""Shared fixtures: one real local Ray cluster per pytest session (starting Ray costs ~5 s); and the layout
rule: every test under tests/integration/ is marked `integration` (`-m "not integration"` runs the unit tests),
and a unit test that asks for Ray is refused at collection."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = Path(__file__).resolve().parent / "integration"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(config, items):
    """Mark by place: tests/integration/ holds what starts Ray, the S3 server, several nodes or processes,
    whole jobs, or long training; tests/unit/ must not need Ray."""
    misplaced = []
    for item in items:
        if Path(item.path).resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
        elif "ray_cluster" in getattr(item, "fixturenames", ()):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError("tests that start Ray belong under tests/integration/: " + ", ".join(misplaced))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a 2-core box run ~20x faster single-threaded than with threads fighting."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with capped object store and 4 logical CPUs (2-core machine: see docs/upstream-compat.md#loader-pitfalls)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
