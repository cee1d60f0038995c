"""Ray Train end to end, in one test because every fit costs tens of seconds on 2 cores: `ray job submit`
against a real `ray start --head` cluster, with 2 CPU workers, one of which fails once mid-run; Ray Train
restarts the group from the last checkpoint and training completes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_train_loop import write_mixture
from trainer import checkpointing as ck

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line names our private Ray temp dir (only ours: the dir is unique)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop only the cluster this test started. (`ray stop` would kill every Ray on the machine, including
    other people's test clusters, so it is not used.)"""
    import signal
    import time

    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    deadline = time.time() + 20
    while _pids_of(temp_dir) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _pids_of(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_job_submit_on_a_real_cluster(tmp_path):
    import time
    import urllib.request

    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    mix = write_mixture(tmp_path / "data")
    port, dash, agent, agent_grpc, metrics, rt_env = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="rayjob_", dir="/tmp")      # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         # own agent ports: the default job-agent port 52365 may belong to another Ray on this machine
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         "--object-store-memory=300000000", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:   # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "Ray head did not come up in 120 s"
                time.sleep(1)
        storage = tmp_path / "runs"
        cmd = (
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
             "python", "jobs/train.py", "--config", str(mix), "--storage_path", str(storage), "--num_workers", "2",
             "--total_steps", "6", "--save_every", "2", "--log_every", "2", "--dataloader_workers", "0",
             "--max_failures", "1", "--inject_failure_at_step", "3", "--inject_failure_rank", "1", "--json"])
        for _ in range(15):   # the job agent registers a little after the dashboard answers
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
            out = proc.stdout + proc.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert proc.returncode == 0, out[-4000:]
        summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        assert summary["ray"].startswith("Ray cluster at"), summary       # joined the cluster, not embedded
        assert summary["error"] is None and summary["metrics"]["step"] == 6
        run = storage / "mix"
        assert (run / ".injected_failure_step3_rank1").exists()           # the failure did happen
        starts = [e for e in _events(run) if e["event"] == "start"]
        assert [s["step"] for s in starts] == [0, 2], starts            # restarted from checkpoint 2
        assert "restart after failure" in starts[1]["reason"]
        final = run / "checkpoints" / "0000006"
        assert ck.is_complete(final) and summary["last_checkpoint"] == str(final)
        assert ck.newest_complete(run / "checkpoints") == final
        for rank in (0, 1):
            assert (final / ck.stream_state_file(rank, 2)).is_file()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 6
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
