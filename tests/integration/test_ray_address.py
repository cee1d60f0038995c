"""Which Ray the jobs use, with a real `ray start --head` cluster on the machine (README "Running on a
cluster", docs/cluster.md#which-ray): without an address `jobs/ingest.py` and `jobs/train.py` run on an
embedded local Ray of their own and say in one line that a cluster runs and is not used; with
`--address auto` they run on the cluster (the node ids their tasks and workers record are the cluster's);
a stale address file is ignored quietly. A user error raised inside a training worker (every image of the
mixture corrupt past its header, which only decoding finds) is reported once, in one line, exit 2, and
the worker group is not restarted.

The cluster is private to the test: its temp dir is <RAY_TMPDIR>/ray and the jobs run with that RAY_TMPDIR,
so for them it is "the machine's cluster" while other Ray users on the machine never see it. One test,
few subprocess runs: a cluster start and five Ray runs cost about 3 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.ray_nodes import RayNode, free_port, pids_under, stop_nodes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NOTE = "a Ray cluster runs on this machine"


def _run(cmd: list[str], env: dict, timeout: float, expect_rc: int = 0) -> tuple[str, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, *cmd], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    out = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == expect_rc, out
    for noise in ("Traceback", "FutureWarning", "DeprecationWarning"):
        assert noise not in proc.stdout + proc.stderr, out
    return proc.stdout, proc.stderr, time.monotonic() - started


def _last_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    for i in reversed(range(len(lines))):
        if lines[i].startswith("{"):
            return json.loads("\n".join(lines[i:]))
    raise AssertionError(f"no JSON summary:\n{stdout[-3000:]}")


def _worker_nodes(run_dir: Path) -> set[str]:
    return {json.loads(line)["node_id"] for line in (run_dir / "workers.jsonl").read_text().splitlines()}


def _corrupt_png_bodies(folder: Path) -> int:
    """Overwrite each PNG's IDAT payload (the compressed pixels) in place: signature, IHDR (the ingest's header
    probe reads the size there), lengths and the IEND end marker stay, so the ingest accepts the image and
    decoding it in the trainer fails."""
    n = 0
    for png in folder.rglob("*.png"):
        data = bytearray(png.read_bytes())
        at = data.find(b"IDAT")
        size = int.from_bytes(data[at - 4:at], "big")
        data[at + 4:at + 4 + size] = b"\x55" * size
        png.write_bytes(bytes(data))
        n += 1
    return n


def test_local_ray_beside_a_cluster_and_address_auto(tmp_path):
    from tests.helpers.shard_factory import make_catalog, tiny, write_config

    catalog = make_catalog(tmp_path / "data", [tiny("vqa", "sft", rows=8, seed=1),
                                               tiny("txt", "text_only", rows=6, seed=2),
                                               tiny("bad", "sft", rows=4, seed=3)])
    catalog.write_text(catalog.read_text() + "tokenizer: builtin\n")
    assert _corrupt_png_bodies(tmp_path / "data" / "sources" / "bad") > 0
    train_section = """
train:
  model: tiny
  from_scratch: true
  visual_gen: false
  warmup_steps: 1
  log_every: 1
  expected_num_tokens: 384
  max_num_tokens: 640
  max_num_tokens_per_sample: 384
  prefer_buffer_before: 192
"""
    shards = tmp_path / "shards"
    good = write_config(tmp_path / "good.yaml", f"catalog: {catalog}\nshards: {shards}\n"
                        "sft: {dataset_names: [vqa], weight: 2}\ntext_only: {dataset_names: [txt], weight: 1}\n"
                        + train_section)
    bad = write_config(tmp_path / "bad.yaml", f"catalog: {catalog}\nshards: {shards}\n"
                       "sft: {dataset_names: [bad], weight: 1}\n" + train_section)

    ray_tmp = tempfile.mkdtemp(prefix="rt_", dir="/tmp")      # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")}
    env.update({"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)})
    train = ["jobs/train.py", "--total_steps", "2", "--save_every", "2", "--num_workers", "1",
             "--dataloader_workers", "0", "--json"]
    nodes: list[RayNode] = []
    try:
        nodes.append(RayNode(["--head", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=false",
                              "--object-store-memory=150000000"], env, temp_dir=f"{ray_tmp}/ray"))
        nodes[0].wait_started(time.monotonic() + 180)
        head_session = sorted(Path(ray_tmp, "ray").glob("session_2*"))[0]

        # --address auto: the ingest's chunk tasks run on the cluster
        out, err, _ = _run(["jobs/ingest.py", str(catalog), "--out", str(shards), "--address", "auto", "--json",
                            "--quiet"], env, timeout=240)
        report = _last_json(out)
        assert [d["status"] for d in report["datasets"]] == ["built"] * 3 and NOTE not in err
        (cluster_node,) = set(report["nodes"])
        assert cluster_node in (head_session / "logs" / "raylet.out").read_text(errors="ignore")

        # no address, a cluster on the machine: an embedded local Ray, one note line, the cluster untouched
        out, err, _ = _run(["jobs/ingest.py", str(catalog), "--out", str(tmp_path / "shards_local"), "--json",
                            "--quiet", "--only", "vqa"], env, timeout=240)
        assert err.count(NOTE) == 1 and "--address auto" in err
        local_nodes = set(_last_json(out)["nodes"])
        assert len(local_nodes) == 1 and cluster_node not in local_nodes

        out, _, _ = _run([*train, "--config", str(good), "--storage_path", str(tmp_path / "runs_local")], env,
                         timeout=400)
        assert out.count(NOTE) == 1
        summary = _last_json(out)
        assert summary["error"] is None and summary["metrics"]["step"] == 2
        assert summary["ray"].startswith("embedded local Ray")
        assert cluster_node not in _worker_nodes(tmp_path / "runs_local" / "good")

        out, _, _ = _run([*train, "--config", str(good), "--storage_path", str(tmp_path / "runs_auto"),
                          "--address", "auto"], env, timeout=400)
        summary = _last_json(out)
        assert NOTE not in out and summary["error"] is None and summary["ray"].startswith("Ray cluster at ")
        assert _worker_nodes(tmp_path / "runs_auto" / "good") == {cluster_node}

        # a user error inside a worker: one line, exit 2, no restart (max_failures is 2 by default)
        out, err, _ = _run([*train, "--config", str(bad), "--storage_path", str(tmp_path / "runs_bad"),
                            "--address", "auto"], env, timeout=400, expect_rc=2)
        summary = _last_json(out)
        assert summary["user_error"] is True and "\n" not in summary["error"]
        assert "no sample of this pack could be decoded" in summary["error"], summary
        starts = (tmp_path / "runs_bad" / "bad" / "workers.jsonl").read_text().splitlines()
        assert len(starts) == 1, starts                             # one worker start: not retried
    finally:
        stop_nodes(nodes)
    for node in nodes:
        assert not pids_under(node.temp_dir)

    # a stale address file (its cluster is gone): ignored, no note, no traceback
    stale = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    try:
        Path(stale, "ray").mkdir()
        Path(stale, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
        out, err, _ = _run(["jobs/ingest.py", str(catalog), "--out", str(tmp_path / "shards_stale"), "--json",
                            "--quiet", "--only", "txt"], {**env, "RAY_TMPDIR": stale}, timeout=240)
        assert NOTE not in err and _last_json(out)["ok"]
    finally:
        for pid in pids_under(stale):
            os.kill(pid, 9)
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
