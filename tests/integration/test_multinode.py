"""Two Ray nodes on one machine, started with `ray start` as separate processes (2 CPUs each, a custom
resource each to tell them apart), sharing no disk path for shards: the ingest writes to the localhost S3
server, the trainer reads its shards from there. The ingest's chunk tasks and the two training workers
(STRICT_SPREAD: one per node) record the node they ran on; the test checks both nodes did work.

One test, because starting two nodes and a Ray Train fit costs about a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipelines.storage import uris as storage

from trainer.checkpoint import remote as checkpoint_remote
from tests.helpers.ray_nodes import RayNode, free_port, pids_under, stop_nodes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], env: dict, timeout: float) -> dict:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    lines = proc.stdout.splitlines()
    for i in reversed(range(len(lines))):          # the summary: the last JSON document starting a line
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    raise AssertionError(f"no JSON summary in the output:\n{out[-5000:]}")


def test_two_nodes_ingest_and_train(tmp_path, s3_server):
    from tests.helpers.shard_factory import make_catalog, tiny, write_config

    bucket = storage.as_path(f"s3://medloom-mn-{uuid.uuid4().hex[:8]}", endpoint=s3_server)
    bucket.create_bucket()
    shards = f"s3://{bucket.bucket}/shards"
    catalog = make_catalog(tmp_path / "data", [tiny("vqa", "sft", rows=16, seed=1),
                                               tiny("txt", "text_only", rows=8, seed=2)])
    catalog.write_text(catalog.read_text() + "rows_per_shard: 4\ntokenizer: builtin\n")   # 6 chunk tasks
    mix = write_config(tmp_path / "mix.yaml", f"""
catalog: {catalog}
shards: {shards}
sft: {{dataset_names: [vqa], weight: 2}}
text_only: {{dataset_names: [txt], weight: 1}}
train:
  model: tiny
  from_scratch: true
  visual_gen: false           # VQA + text only: no generation dataset in this mixture
  warmup_steps: 1
  log_every: 1
  expected_num_tokens: 384
  max_num_tokens: 640
  max_num_tokens_per_sample: 384
  prefer_buffer_before: 192
""")
    # Every node gets the S3 endpoint and credentials from its environment, as on a real cluster.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2", "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)})
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        deadline = time.monotonic() + 180
        nodes.append(RayNode(["--head", f"--port={port}", "--num-cpus=2", '--resources={"medloom_head": 1}',
                              "--include-dashboard=false", "--object-store-memory=150000000"], env))
        nodes[0].wait_started(deadline)     # sequential starts are faster than parallel ones on 2 cores
        nodes.append(RayNode([f"--address={address}", "--num-cpus=2", '--resources={"medloom_worker": 1}',
                              "--object-store-memory=150000000"], env))
        nodes[1].wait_started(deadline)

        ingest = _run([sys.executable, "jobs/ingest.py", str(catalog), "--out", shards, "--address", address,
                       "--json", "--quiet"], env, timeout=240)
        assert ingest["ok"] and [d["status"] for d in ingest["datasets"]] == ["built", "built"]
        ingest_nodes = set(ingest["nodes"])
        assert len(ingest_nodes) == 2 and sum(ingest["nodes"].values()) == 6, ingest["nodes"]
        assert storage.is_complete(bucket / "shards" / "vqa", "_manifest.json")

        # checkpoints to S3 too: the run directory stays local ($MEDLOOM_LOCAL_RUNS), complete checkpoints
        # are mirrored to s3://.../runs/mix/checkpoints with COMPLETE.json last
        runs = tmp_path / "runs"
        summary = _run([sys.executable, "jobs/train.py", "--config", str(mix), "--address", address,
                        "--num_workers", "2", "--placement_strategy", "STRICT_SPREAD",
                        "--storage_path", f"s3://{bucket.bucket}/runs", "--total_steps", "2", "--save_every", "2",
                        "--dataloader_workers", "0", "--json"], {**env, "MEDLOOM_LOCAL_RUNS": str(runs)},
                       timeout=400)
        assert summary["error"] is None and summary["metrics"]["step"] == 2, summary
        remote = bucket / "runs" / "mix" / "checkpoints"
        assert summary["remote_checkpoint_dir"] == remote.display()
        assert checkpoint_remote.newest_remote_complete(remote) == remote / "0000002"
        workers = [json.loads(line) for line in (runs / "mix" / "workers.jsonl").read_text().splitlines()]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        train_nodes = {w["node_id"] for w in workers}
        assert len(train_nodes) == 2 and train_nodes == ingest_nodes    # one worker on each of the two nodes
    finally:
        stop_nodes(nodes)
    for node in nodes:
        assert not pids_under(node.temp_dir)
