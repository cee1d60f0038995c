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


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_stages")
    catalog = make_catalog(root, [tiny("vqa", "sft", 40), tiny("txt", "text_only", 30)])
    return root, catalog


def _write(root, catalog, name: str, body: str) -> Path:
    return write_config(root / name, f"catalog: {catalog}\n{body}\n"
                                     "train: {expected_num_tokens: 1024, max_num_tokens: 1280, "
                                     "max_num_tokens_per_sample: 1024, prefer_buffer_before: 512, max_buffer_size: 4}\n")


TWO_STAGES = """sft: {dataset_names: [vqa], weight: 1}
text_only: {dataset_names: [txt], weight: 1}
stages:
  - {name: understand, until_step: 40, weight: {sft: 3, text_only: 1}}
  - {name: generate, until_step: 80, weight: {sft: 1, text_only: 3}}"""


def test_plan_json_reports_each_stage_within_five_points(staged, capsys):
    path = _write(*staged, "two.yaml", TWO_STAGES)
    assert plan_job.main([str(path), "--world-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 80 and {"groups", "datasets", "packing_efficiency"} <= set(report)
    assert [(s["name"], s["until_step"]) for s in report["stages"]] == [("understand", 40), ("generate", 80)]
    for stage, want in zip(report["stages"], ({"sft": 0.75, "text_only": 0.25}, {"sft": 0.25, "text_only": 0.75})):
        assert set(stage["groups"]) == set(report["groups"])
        for group, weight in want.items():
            g = stage["groups"][group]
            assert g["weight"] == weight and abs(g["sample_share"] - weight) < 0.05, (stage["name"], group, g)
            assert 0 < g["token_share"] < 1


def test_stream_job_switches_stage_and_resumes_across_the_boundary(staged, tmp_path, capsys):
    from jobs import stream as stream_job

    path = _write(*staged, "two.yaml", TWO_STAGES)

    def run(*args):
        assert stream_job.main([str(a) for a in args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    full = run(path, "--rank", 0, "--world-size", 2, "--take", 50, "--json")
    assert [r["stage"] for r in full] == ["understand"] * 40 + ["generate"] * 10
    assert [r["step"] for r in full] == list(range(50))
    state = tmp_path / "s.json"
    head = run(path, "--rank", 0, "--world-size", 2, "--take", 30, "--json", "--state-out", state)
    tail = run(path, "--rank", 0, "--world-size", 2, "--take", 20, "--json", "--state-in", state)
    assert head + tail == full


def test_plan_takes_world_size_and_loader_workers_from_train_section(staged, capsys):
    root, catalog = staged
    path = write_config(root / "topo.yaml", f"catalog: {catalog}\nsft: {{dataset_names: [vqa]}}\n"
                                            "train: {num_workers: 3, dataloader_workers: 2}\n")
    assert plan_job.main([str(path), "--steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["world_size"], report["num_workers"], report["packs"]) == (3, 2, 18)
    assert (report["world_size_from"], report["num_workers_from"]) == ("train: num_workers", "train: dataloader_workers")
    assert plan_job.main([str(path), "--steps", "3", "--world-size", "1"]) == 0
    assert "world size 1 (--world-size), loader workers per rank 2 (train: dataloader_workers)" in capsys.readouterr().out


@pytest.mark.parametrize("body,match", [
    ("sft: {dataset_names: [vqa], weight: .nan}", r"two\.yaml, line 2: sft\.weight must be a finite number >= 0, got nan"),
    ("sft: {dataset_names: [vqa], weight: .inf}", r"line 2: sft\.weight must be a finite number >= 0, got inf"),
    ("sft: {dataset_names: [vqa], weight: heavy}", r"line 2: sft\.weight must be a finite number >= 0, got 'heavy'"),
    ("sft: {dataset_names: {a: [vqa], b: [txt]}, weight: {a: .nan, b: 1}}", r"line 2: sft\.weight\[a\] must be a finite"),
    ("sft: {dataset_names: [vqa, vqa]}", r"line 2: sft\.dataset_names names 'vqa' more than once"),
    ("sft: {dataset_names: {a: [vqa, vqa]}}", r"line 2: sft\.dataset_names\[a\] names 'vqa' more than once"),
])
def test_validation_cases_are_one_error_line_and_exit_2(staged, body, match):
    path = _write(*staged, "two.yaml", body)
    proc = subprocess.run([sys.executable, "jobs/plan.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    import re
    assert re.search(match, lines[0]), lines[0]


def test_num_used_data_beyond_the_dataset_is_a_note_with_the_real_size(staged, capsys):
    path = _write(*staged, "clip.yaml", "sft: {dataset_names: [vqa], num_used_data: [500]}")
    assert plan_job.main([str(path), "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["groups"]["sft"]["rows"] == 40
    assert any("num_used_data 500 for dataset 'vqa' exceeds its 40 rows; all 40 are used" in n for n in report["notes"])
