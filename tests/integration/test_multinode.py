"""The README's "Running on a cluster" recipe, on one machine: two Ray nodes started with `ray start` as separate
processes (2 CPUs each, their own temp dirs), the head with the job server, and the jobs sent with
`ray job submit --working-dir <checkout> -- python jobs/...` exactly as the README shows, shards and
checkpoints on a shared absolute path (`--out`, `--shards`, `--storage_path`). The working dir is a copy of
the tracked files, unchanged; `shards/` and `runs/` are not shipped.

Checked: a train job with the config's own relative paths (storage_path: runs, shards in the catalog's
output_dir) is refused, one `error:` line per path, before Ray Train starts; the ingest of the shipped catalog ran
chunks on both nodes; the two training workers (STRICT_SPREAD: one per node) recorded both node ids, and
the checkpoint is complete on the shared path; one worker failed once mid-run (injected) and Ray Train
restarted the group from the last checkpoint, and training completed (Ray Train's recovery under
`ray job submit`).

One test, because two nodes, a job server and three jobs cost about 2-3 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.ray_nodes import RayNode, free_port, pids_under, ray_binary, stop_nodes
from trainer.checkpoint import local as ck

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _checkout_copy(dest: Path) -> Path:
    """The tracked files: what `--working-dir .` ships from a clean checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _submit(dashboard: str, workdir: Path, entrypoint: list[str], env: dict, timeout: float,
            expect_ok: bool = True) -> str:
    cmd = [ray_binary(), "job", "submit", "--address", dashboard, "--working-dir", str(workdir), "--",
           *entrypoint]
    for _ in range(15):   # the job agent registers a little after the dashboard answers
        proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        if "No available agent" not in out:
            break
        time.sleep(2)
    assert (proc.returncode == 0) is expect_ok, f"$ {' '.join(entrypoint)}\n{out[-6000:]}"
    return out


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _last_json(text: str) -> dict:
    """The last JSON document that starts a line (the job's `--json` summary; Ray's status lines follow it)."""
    lines = text.splitlines()
    for i in reversed(range(len(lines))):
        if lines[i].startswith("{"):
            try:
                return json.JSONDecoder().raw_decode("\n".join(lines[i:]))[0]
            except ValueError:
                continue
    raise AssertionError(f"no JSON summary in the job output:\n{text[-5000:]}")


def test_readme_cluster_recipe_on_two_nodes(tmp_path):
    shared = tmp_path / "shared" / "medloom"           # "a filesystem mounted at the same path on every node"
    shared.mkdir(parents=True)
    workdir = _checkout_copy(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])})
    port, dash_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    dashboard = f"http://127.0.0.1:{dash_port}"
    nodes: list[RayNode] = []
    try:
        deadline = time.monotonic() + 240
        nodes.append(RayNode(["--head", f"--port={port}", "--num-cpus=2", '--resources={"medloom_head": 1}',
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                              "--object-store-memory=150000000"], env))
        nodes[0].wait_started(deadline)     # sequential starts are faster than parallel ones on 2 cores
        nodes.append(RayNode([f"--address={address}", "--num-cpus=2", '--resources={"medloom_worker": 1}',
                              "--object-store-memory=150000000"], env))
        nodes[1].wait_started(deadline)

        # rank 1 fails once at step 3 (--inject_failure_*): Ray Train restarts the group from checkpoint 2
        train = ["python", "jobs/train.py", "--config", "configs/radiology_sft.yaml", "--num_workers", "2",
                 "--placement_strategy", "STRICT_SPREAD", "--total_steps", "4", "--warmup_steps", "1",
                 "--save_every", "2", "--dataloader_workers", "0", "--max_failures", "1",
                 "--inject_failure_at_step", "3", "--inject_failure_rank", "1", "--json"]
        # without the flags, the config's storage_path (runs) and its catalog's shards folder would live in
        # the job's unpacked working dir: refused in one line before any worker starts
        refused = _submit(dashboard, workdir, train, env, 120, expect_ok=False)
        # (`ray job submit` shows the job's output twice: streamed, then in the failed job's status message)
        errors = sorted({line for line in refused.splitlines() if line.startswith("error:")})
        assert "Traceback" not in refused, refused[-4000:]
        paths = [e for e in errors if "problems above" not in e]
        assert len(paths) == 2 and len(errors) == 3 and all("s3://" in e for e in paths), errors
        assert "--storage_path" in paths[0] and "shards folder" in paths[1], paths

        out = _submit(dashboard, workdir, ["python", "jobs/ingest.py", "catalog/radiology.yaml", "--out",
                                           str(shared / "shards"), "--json", "--quiet"], env, 300)
        ingest = _last_json(out)
        assert ingest["ok"] and {d["status"] for d in ingest["datasets"]} == {"built"}, ingest
        assert len(ingest["nodes"]) == 2, ingest["nodes"]            # chunks ran on both nodes
        assert (shared / "shards" / "ct_mr_vqa" / "_manifest.json").is_file()

        out = _submit(dashboard, workdir, [*train, "--shards", str(shared / "shards"), "--storage_path",
                                           str(shared / "runs")], env, 500)
        summary = _last_json(out)
        assert summary["ray"].startswith("Ray cluster at"), summary       # joined the cluster, not embedded
        assert summary["error"] is None and summary["metrics"]["step"] == 4, summary
        assert "FutureWarning" not in out, out[-5000:]
        run = shared / "runs" / "radiology_sft"
        assert (run / ".injected_failure_step3_rank1").exists()           # the failure did happen
        starts = [e for e in _events(run) if e["event"] == "start"]
        assert [s["step"] for s in starts] == [0, 2], starts            # restarted from checkpoint 2
        assert "restart after failure" in starts[1]["reason"]
        final = run / "checkpoints" / "0000004"
        assert ck.is_complete(final) and summary["last_checkpoint"] == str(final)
        assert ck.newest_complete(run / "checkpoints") == final
        for rank in (0, 1):
            assert (final / ck.stream_state_file(rank, 2)).is_file()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 4
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        workers = [json.loads(line) for line in (run / "workers.jsonl").read_text().splitlines()]
        assert sorted(w["rank"] for w in workers) == [0, 0, 1, 1]         # started, then restarted once
        assert {w["node_id"] for w in workers} == set(ingest["nodes"])   # one worker on each node
    finally:
        stop_nodes(nodes)
    for node in nodes:
        assert not pids_under(node.temp_dir)
