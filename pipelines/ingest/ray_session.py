"""Which Ray a job runs on, and where a `ray job submit` job may keep its files (docs/cluster.md#which-ray).

No address: an embedded local Ray of this process's own (`ray.init(address="local")`), even when a cluster
started with `ray start` runs on the machine or a stale address file of one is left behind: a plain
`ray.init()` would join that cluster (or fail on a dead one) and refuses the local settings. `--address` or
RAY_ADDRESS (`ray job submit` sets it): join that cluster. Either way, one line says which, and a Ray that
cannot be reached is one `RaySessionError` line, never a traceback.

Used by the ingest (`pipelines.ingest.execute`) and the trainer (`trainer.launch`).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray's job supervisor in the entrypoint it runs


class RaySessionError(RuntimeError):
    """A Ray cluster that cannot be used, or a path a submitted job cannot use: one line for the user."""


# -- which Ray ----------------------------------------------------------------------------------------------

def ray_address_file() -> Path:
    """The file `ray start` writes the cluster address to (what a plain `ray.init()` would join):
    $RAY_TMPDIR/ray, else $TMPDIR/ray on Linux, else /tmp/ray; `ray_current_cluster` in it."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray" / "ray_current_cluster"


def _split(address: str) -> Optional[tuple[str, int]]:
    target = address.strip().split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def reachable(address: str, timeout: float = 2.0) -> bool:
    """True when something accepts a TCP connection at host:port ('auto' and bare names count as reachable:
    Ray resolves them itself)."""
    parts = _split(address)
    if parts is None:
        return True
    try:
        with socket.create_connection(parts, timeout=timeout):
            return True
    except OSError:
        return False


def machine_cluster() -> Optional[str]:
    """The address of a live cluster started on this machine with `ray start` (its address file names a GCS
    that accepts connections); None when there is none or the file is stale."""
    try:
        address = ray_address_file().read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not address or _split(address) is None:
        return None
    return address if reachable(address, timeout=1.0) else None


def requested_address(flag: Optional[str]) -> Optional[str]:
    """The cluster the user asked for: the --address flag, else a non-empty RAY_ADDRESS; None = local Ray."""
    return (flag or "").strip() or os.environ.get("RAY_ADDRESS", "").strip() or None


def start_or_join(flag: Optional[str], local: dict[str, Any], join: dict[str, Any]) -> tuple[str, str]:
    """Join the cluster the user asked for, or start an embedded local Ray with `local` settings (`join`:
    settings for ray.init when joining). Returns (what was done, a note to print or "")."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = requested_address(flag)
    if address == "auto":
        # Ray's own "auto" falls back to any Ray process it finds on the machine; the cluster `ray start` recorded
        # is the one meant (docs/cluster.md#which-ray)
        address = machine_cluster() or address
    if address and address.lower().startswith(("http://", "https://")):
        raise RaySessionError(
            f"{address!r} (--address or RAY_ADDRESS) is a Ray job server's address, for `ray job submit`; submit "
            f"this job with `ray job submit --working-dir . -- python jobs/...`, pass the cluster's GCS address "
            f"(--address HEAD_IP:6379, or auto on a cluster node), or unset RAY_ADDRESS to run on a local Ray")
    if address:
        if not reachable(address, timeout=5.0):
            raise RaySessionError(
                f"cannot reach the Ray cluster at {address!r} (nothing listens there); check the address, start a "
                f"cluster with `ray start --head`, or drop --address / RAY_ADDRESS to run on a local Ray")
        try:
            ray.init(address=address, **join)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RaySessionError(
                f"cannot join the Ray cluster at {address!r} ({first}); start one with `ray start --head`, or "
                f"drop --address / RAY_ADDRESS to run on a local Ray") from None
        return f"Ray cluster at {address}", ""
    cluster = machine_cluster()
    _init_local(local)
    note = (f"a Ray cluster runs on this machine ({cluster}) and is not used: this run has its own local Ray; "
            f"pass --address auto to run on the cluster") if cluster else ""
    return "embedded local Ray", note


def _init_local(settings: dict[str, Any]) -> None:
    """ray.init(address="local") on a GCS port chosen here, told to the session's workers and actors as their
    RAY_ADDRESS: Ray Train's helper actors look the cluster up by address, and with no RAY_ADDRESS they find
    every Ray on the machine (or the one `ray start` recorded) instead of this one."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    runtime_env = dict(settings.get("runtime_env") or {})
    address = f"{ray.util.get_node_ip_address()}:{port}"
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": address}
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", **{**settings, "runtime_env": runtime_env})
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved


# -- paths of a submitted job -------------------------------------------------------------------------------

def submitted_job_dir() -> Optional[Path]:
    """Under `ray job submit`: the Ray session folder this job's working directory was unpacked into (the
    working directory itself when it is not inside one). Files there live on one node only and are
    deleted with the session. None outside a submitted job."""
    if JOB_ENV not in os.environ:
        return None
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if folder.name.startswith("session_"):
            return folder
    return cwd


def job_path_problem(value: str | Path, what: str) -> Optional[str]:
    """Why `value` (a local output or shared input path, as given) cannot be used by a submitted job, or
    None. `what` names it for the user: "--storage_path", "the mixture's shards folder", ..."""
    text = str(value)
    if "://" in text:
        return None
    root = submitted_job_dir()
    if root is None:
        return None
    path = Path(text).expanduser()
    resolved = (Path.cwd() / path).resolve()
    if path.is_absolute() and not resolved.is_relative_to(root):
        return None
    where = "" if str(resolved) == text else f" ({resolved})"
    return (f"{what} {text}{where} is inside this `ray job submit` job's working directory, which Ray "
            f"unpacks for this job on one node and deletes afterwards (docs/cluster.md); use a path every node "
            f"sees (an absolute path on a shared filesystem, e.g. /shared/medloom/...) or s3://bucket/prefix")
