"""Ray Train end to end, in one test because every fit costs tens of seconds on 2 cores: `ray job submit`
against a real `ray start --head` cluster, with 2 CPU workers, one of which fails once mid-run; Ray Train
restarts the group from the last checkpoint and training completes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.shard_factory import write_mixture
from tests.helpers.ray_nodes import RayNode, free_port, ray_binary, stop_nodes
from trainer.checkpoint import local as ck

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_ray_job_submit_on_a_real_cluster(tmp_path):
    import time
    import urllib.request

    ray_bin = ray_binary()
    mix = write_mixture(tmp_path / "data")
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    head = RayNode(["--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
                    f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--object-store-memory=300000000"], env)
    try:
        deadline = time.time() + 120
        while True:   # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert head.proc.poll() is None, f"ray start --head exited:\n{head.log.read_text()[-3000:]}"
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
        stop_nodes([head])
