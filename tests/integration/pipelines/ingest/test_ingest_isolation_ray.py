"""Hostile inputs and dying workers through the real Ray Data pipeline: every line is accounted for, the clean
datasets are published, nothing hangs, and `jobs/ingest.py` ends with a summary, never a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from datasets_catalog.catalog import load_catalog
from pipelines.ingest import driver
from pipelines.ingest.build import STATUS_BUILT, STATUS_FAILED
from tests.unit.pipelines.ingest.test_hostile_inputs import hostile_lines, png, sft

ROOT = Path(__file__).resolve().parents[4]


def _hostile_catalog(root: Path) -> list:
    data = root / "data"
    data.mkdir()
    (data / "good.png").write_bytes(png(40, 30))
    (root / "outside.png").write_bytes(png(10, 10))
    os.mkfifo(data / "fifo.png")
    with open(data / "sparse.png", "wb") as f:
        f.write(png(8, 8)[:64])
        f.truncate(600 * 1024 * 1024)
    (data / "folder.png").mkdir()
    os.symlink(data, root / "link")
    lines = hostile_lines(data)
    (root / "hostile.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw for raw, _ in lines) + b"\n")
    for name in ("clean", "victim", "flaky"):
        (root / f"{name}.jsonl").write_text("\n".join(sft("good.png", answer=f"{name} {i}.") for i in range(6)))
    (root / "catalog.yaml").write_text(
        "output_dir: out\nrows_per_shard: 2\nmax_reject_fraction: 0.9\ndatasets:\n"
        "  - {name: hostile, task: sft, jsonl_path: hostile.jsonl, data_dir: link}\n"
        "  - {name: clean, task: sft, jsonl_path: clean.jsonl, data_dir: data}\n"
        "  - {name: victim, task: sft, jsonl_path: victim.jsonl, data_dir: data}\n"
        "  - {name: flaky, task: sft, jsonl_path: flaky.jsonl, data_dir: data}\n")
    return lines


def kill_some_workers(task):
    """The chunk runner of the test: SIGKILLs its own worker mid-chunk for victim's chunk 1 (every time) and
    for flaky's chunk 0 (the first time only), else runs the real chunk."""
    staging = Path(task.staging_dir)
    if task.dataset == "victim" and task.chunk_index == 1:
        (staging / "chunk-00001.parquet").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    marker = staging.parent / "flaky-died-once"
    if task.dataset == "flaky" and task.chunk_index == 0 and not marker.exists():
        marker.write_text("x")
        os.kill(os.getpid(), signal.SIGKILL)
    from pipelines.ingest.chunk import process_chunk

    return process_chunk(task)


def test_hostile_lines_and_killed_workers_through_ray_data(ray_cluster, tmp_path, monkeypatch):
    lines = _hostile_catalog(tmp_path)
    monkeypatch.setattr(driver, "process_chunk", kill_some_workers)
    started = time.monotonic()
    report = driver.run_ingest(load_catalog(tmp_path / "catalog.yaml"), progress=False, log=lambda m: None)
    assert time.monotonic() - started < 60
    by_name = {d.name: d for d in report.datasets}
    for d in report.datasets:
        assert d.rows_read == d.rows_written + d.rows_rejected, d
    assert by_name["clean"].status == STATUS_BUILT and by_name["clean"].rows_written == 6
    assert by_name["flaky"].status == STATUS_BUILT and by_name["flaky"].rows_written == 6   # retried once, fine
    victim = by_name["victim"]
    assert victim.status == STATUS_BUILT and (victim.rows_written, victim.rows_rejected) == (4, 2)
    assert victim.rejects_by_reason == {"worker_failed": 2}
    assert pd.read_parquet(tmp_path / "out" / "victim")["line_number"].tolist() == [1, 2, 5, 6]
    assert not any("chunk-" in name for name in os.listdir(tmp_path / "out" / "victim"))
    hostile = by_name["hostile"]
    assert hostile.rows_read == len(lines)
    rejects = pd.read_parquet(tmp_path / "out" / "hostile" / "_rejects.parquet")
    assert dict(zip(rejects["line_number"], rejects["reason"])) == {
        i + 1: reason for i, (_, reason) in enumerate(lines) if reason is not None}


def test_ingest_job_prints_a_summary_not_a_traceback(tmp_path):
    _hostile_catalog(tmp_path)
    (tmp_path / "catalog.yaml").write_text(
        (tmp_path / "catalog.yaml").read_text().replace("max_reject_fraction: 0.9", "max_reject_fraction: 0.5"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), str(tmp_path / "catalog.yaml"),
                           "--quiet"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert time.monotonic() - started < 60
    assert "Traceback" not in done.stderr + done.stdout
    assert done.returncode == 1, done.stderr[-2000:]   # hostile: 9 of 14 rejected, over 50 %
    assert "FAILED hostile" in done.stdout and "_failed/hostile/_rejects.parquet" in done.stdout
    assert "json_too_deep 2: line 2:" in done.stdout
    manifests = {p.parent.name: json.loads(p.read_text())["status"] for p in (tmp_path / "out").glob("*/_manifest.json")}
    assert manifests == {"clean": "ok", "victim": "ok", "flaky": "ok"}
    again = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), str(tmp_path / "catalog.yaml"),
                            "--quiet", "--json"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    report = json.loads(again.stdout)
    assert {d["name"]: d["status"] for d in report["datasets"]}["clean"] == "up to date"
    assert {d["name"]: d["status"] for d in report["datasets"]}["hostile"] == STATUS_FAILED
