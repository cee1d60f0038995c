"""Real Ray nodes for the few tests that need `ray start` (job submission, two nodes on one machine).

Each node is a `ray start --block` process in its own session with its own temp dir and ports, so tests
never touch another Ray on the machine; `stop_nodes` stops only what they started (never `ray stop`,
which would kill every Ray here).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_binary() -> str:
    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def pids_under(marker: str) -> list[int]:
    """Processes whose command line names a private Ray temp dir (unique per node, so only ours)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class RayNode:
    """One `ray start --block` process (own session, own temp dir, own agent ports) and its log."""

    def __init__(self, args: list[str], env: dict, temp_dir: str | None = None) -> None:
        # short: socket paths are length-limited. `temp_dir` = <RAY_TMPDIR>/ray makes this node the machine's
        # "current cluster" (ray_current_cluster) for processes that run with that RAY_TMPDIR only
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="raynode_", dir="/tmp")
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        self.log = Path(self.temp_dir) / "start.log"
        # own agent / metrics ports: the defaults (52365, ...) may belong to another Ray on this machine
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        self.proc = subprocess.Popen([ray_binary(), "start", "--block", f"--temp-dir={self.temp_dir}",
                                      "--disable-usage-stats", *ports, *args],
                                     env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_started(self, deadline: float) -> None:
        while "Ray runtime started" not in self.log.read_text(errors="ignore"):
            assert self.proc.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not finish:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


def stop_nodes(nodes: list[RayNode]) -> None:
    """SIGTERM each node's process group, then SIGKILL whatever still names one of their temp dirs."""
    for node in reversed(nodes):
        node.signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for node in nodes:
        try:
            node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.signal(signal.SIGKILL)
    for node in nodes:
        for pid in pids_under(node.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(node.temp_dir, ignore_errors=True)
