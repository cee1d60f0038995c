"""The driver-side preflight, as a user meets it (real processes, real Parquet): jobs/train.py reports a
dataset-name typo in one line with close matches, fast, without importing Ray; reports several problems
together; and a truncated shard is one `error:` line naming the file from plan.py, stream.py, report.py and
train.py alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.shard_factory import make_catalog, tiny, write_config

ROOT = Path(__file__).resolve().parents[3]
TRAIN = """train: {model: tiny, from_scratch: true, num_workers: 2, total_steps: 20, warmup_steps: 2,
        expected_num_tokens: 1024, max_num_tokens: 1280, max_num_tokens_per_sample: 1024,
        prefer_buffer_before: 512}
"""
# Runs jobs/train.py's main and says whether Ray was imported (a Ray worker cannot start without it).
TRAIN_PROBE = ("import sys; from jobs.train import main; rc = main(sys.argv[1:]); "
               "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(rc)")


def run(args: list[str], cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    catalog = make_catalog(root, [tiny("chest_vqa", "sft", 16), tiny("radiology_text", "text_only", 12),
                                  tiny("fundus_t2i", "t2i", 8)])
    return root, catalog


def test_typo_in_train_is_one_line_with_close_matches_fast_and_without_ray(data, tmp_path):
    root, catalog = data
    cfg = write_config(tmp_path / "typo.yaml", f"""catalog: {catalog}
SftJSONLIterableDataset_Ver1: {{dataset_names: [chest_vqq], weight: 1}}
SftJSONLIterableDataset_TextOnly: {{dataset_names: [radiology_text], weight: 1}}
T2IIterableDataset_Ver1: {{dataset_names: [fundus_t2i], weight: 1}}
{TRAIN}""")
    start = time.monotonic()
    proc = run(["jobs/train.py", "--config", str(cfg), "--storage_path", str(tmp_path / "runs")])
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert seconds < 5.0, f"took {seconds:.1f} s"       # target 2 s on an idle machine: margin for a busy one
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {cfg}, line 2: group 'SftJSONLIterableDataset_Ver1' names dataset "
                               f"'chest_vqq', which is not in the catalog {catalog}. Close matches: chest_vqa.")
    assert not (tmp_path / "runs").exists()
    probe = run(["-c", TRAIN_PROBE, "--config", str(cfg), "--storage_path", str(tmp_path / "runs")])
    assert probe.returncode == 2 and probe.stdout.strip().endswith("ray not imported")


def test_train_reports_every_problem_at_once(data, tmp_path):
    root, catalog = data
    cfg = write_config(tmp_path / "many.yaml", f"""catalog: {catalog}
SftJSONLIterableDataset_Ver1: {{dataset_names: [chest_vqq], weight: 1}}
SftJSONLIterableDataset_TextOnly: {{dataset_names: [chest_vqa], weight: 1}}
{TRAIN}""")
    proc = run(["jobs/train.py", "--config", str(cfg), "--storage_path", str(tmp_path / "runs"),
                "--total_steps", "10", "--warmup_steps", "50", "--lr_scheduler", "linear"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    text = "\n".join(lines)
    for expected in ("names dataset 'chest_vqq', which is not in the catalog",        # a typo
                     "dataset 'chest_vqa' is a",                                       # a task-kind mismatch
                     "visual_gen is True but the mixture has no generation dataset",  # the mixture vs the args
                     "warmup_steps (50) is longer than training (total_steps 10)",
                     "lr_scheduler must be one of constant, cosine, got 'linear'"):
        assert expected in text, text
    assert lines[-1] == "error: 5 problems above; nothing was started"


@pytest.fixture()
def truncated(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("chest_vqa", "sft", 16), tiny("fundus_t2i", "t2i", 8)])
    part = sorted((tmp_path / "shards" / "chest_vqa").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])   # a copy cut short: no footer
    cfg = write_config(tmp_path / "mix.yaml", f"""catalog: {catalog}
SftJSONLIterableDataset_Ver1: {{dataset_names: [chest_vqa], weight: 1}}
T2IIterableDataset_Ver1: {{dataset_names: [fundus_t2i], weight: 1}}
{TRAIN}""")
    return tmp_path, cfg, part


@pytest.mark.parametrize("job", ["plan", "stream", "report", "train"])
def test_truncated_shard_is_one_line_naming_the_file(truncated, job):
    root, cfg, part = truncated
    args = {"plan": ["jobs/plan.py", str(cfg)],
            "stream": ["jobs/stream.py", str(cfg), "--take", "2"],
            "report": ["jobs/report.py", str(root / "shards"), "--out", str(root / "r.html")],
            "train": ["jobs/train.py", "--config", str(cfg), "--storage_path", str(root / "runs")]}[job]
    proc = run(args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {part}: shard file is unreadable (")
    assert "re-run the ingest with --force --only chest_vqa" in lines[0]


def test_missing_shard_file_is_named_by_report(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("chest_vqa", "sft", 40)])
    manifest = tmp_path / "shards" / "chest_vqa" / "_manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "catalog": str(catalog)}))  # as ingest writes
    part = sorted((tmp_path / "shards" / "chest_vqa").glob("part-*.parquet"))[-1]
    part.unlink()
    proc = run(["jobs/report.py", str(tmp_path / "shards"), "--out", str(tmp_path / "r.html")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {part}: shard file listed in _manifest.json is missing; re-run the "
                                   f"ingest with --force --only chest_vqa (python jobs/ingest.py {catalog} --force "
                                   f"--only chest_vqa)")
