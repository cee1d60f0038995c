"""jobs/plan.py: stable --json, shares and passes from metadata, never-fit samples, clean errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import plan as plan_job
from tests.helpers.shard_factory import make_catalog, tiny, write_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    catalog = make_catalog(root, [tiny("vqa", "sft", 40, long_every=10), tiny("txt", "text_only", 30)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 3}}
text_only: {{dataset_names: [txt], weight: 1, is_mandatory: true}}
train: {{expected_num_tokens: 1024, max_num_tokens: 1280, max_num_tokens_per_sample: 1024,
         prefer_buffer_before: 512, max_buffer_size: 4}}
""")


def test_plan_json_is_stable_and_consistent(cfg_path, capsys):
    assert plan_job.main([str(cfg_path), "--steps", "40", "--world-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["groups"]) == {"sft", "text_only"}
    for g in report["groups"].values():
        assert {"weight", "sample_share", "token_share"} <= set(g)
    assert report["groups"]["sft"]["weight"] == 0.75
    assert sum(g["sample_share"] for g in report["groups"].values()) == pytest.approx(1, abs=1e-5)
    assert {"passes", "samples"} <= set(report["datasets"]["vqa"])
    assert report["datasets"]["txt"]["passes"] > 1            # mandatory + weighted draws on 30 rows
    assert 0 < report["packing_efficiency"] <= 1
    assert report["packs"] == 80
    # every 10th vqa record is ~20k tokens: 4 of 40 rows can never fit 1024 tokens
    assert report["never_fit"]["count"] == 4 and report["never_fit"]["by_dataset"]["vqa"] == 4
    assert report["never_fit"]["skipped_in_run"] > 0


def test_plan_human_output(cfg_path, capsys):
    assert plan_job.main([str(cfg_path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "mean packing efficiency" in out and "never fit" in out and "vqa" in out


def test_plan_error_is_one_line_without_traceback(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", f"catalog: {tmp_path}/none.yaml\nsft: {{dataset_names: [x]}}\n")
    proc = subprocess.run([sys.executable, "jobs/plan.py", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "catalog file not found" in proc.stderr
