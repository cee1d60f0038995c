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


# Skips CI accepts (the CI environment variable set, as .ci/run does): test id -> a substring of the skip reason.
# Any other skip in CI is a failure: a missing install step (Chromium, an extra) must not pass as green.
CI_ALLOWED_SKIPS: dict[str, str] = {
    # on a machine with a CUDA device the GPU check runs for real instead of printing its SKIP line
    "tests/integration/test_gpu_check.py::test_shell_script_skips_cleanly_without_a_gpu": "a CUDA device is visible",
    # a source archive (no .git) cannot list the tracked files the carried-wheel check needs
    "tests/integration/test_gpu_check.py::test_carried_wheels_fit_the_transfer_limit": "not a git checkout",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def ci_skip_allowed(nodeid: str, reason: str) -> bool:
    """True when CI_ALLOWED_SKIPS lists this test (parametrised ids included) with a matching reason."""
    base = nodeid.split("[", 1)[0]
    allowed = CI_ALLOWED_SKIPS.get(base)
    return allowed is not None and allowed in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skip not listed in CI_ALLOWED_SKIPS becomes a failure that names the test and the reason."""
    outcome = yield
    report = outcome.get_result()
    if not _in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if ci_skip_allowed(report.nodeid, reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped in CI ({reason}); install what the test needs, or list it in "
                       f"tests/conftest.py CI_ALLOWED_SKIPS with the reason")


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
        ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
