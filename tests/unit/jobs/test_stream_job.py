"""jobs/stream.py: one JSON line per pack, resume through --state-out/--state-in, world-size change."""
from __future__ import annotations

import json

import pytest

from jobs import stream as stream_job
from tests.helpers.shard_factory import make_catalog, tiny, write_config


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamjob")
    catalog = make_catalog(root, [tiny("vqa", "sft", 25), tiny("txt", "text_only", 17)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 1}}
text_only: {{dataset_names: [txt], weight: 1}}
train: {{expected_num_tokens: 1024, max_num_tokens: 1280, max_num_tokens_per_sample: 1024,
         prefer_buffer_before: 512, max_buffer_size: 4}}
""")


def run(capsys, *args) -> list[dict]:
    assert stream_job.main([str(a) for a in args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_stream_json_lines_and_resume(cfg_path, tmp_path, capsys):
    full = run(capsys, cfg_path, "--rank", 1, "--world-size", 2, "--take", 6, "--json")
    assert [r["index"] for r in full] == list(range(6))
    assert all({"rank", "index", "samples", "tokens"} <= set(r) and r["rank"] == 1 for r in full)
    assert all(s.split(":")[0] in ("vqa", "txt") for r in full for s in r["samples"])
    state = tmp_path / "r1.json"
    head = run(capsys, cfg_path, "--rank", 1, "--world-size", 2, "--take", 2, "--json", "--state-out", state)
    tail = run(capsys, cfg_path, "--rank", 1, "--world-size", 2, "--take", 4, "--json", "--state-in", state)
    assert head + tail == full


def test_stream_world_size_change_needs_all_states(cfg_path, tmp_path, capsys):
    files = []
    for rank in range(2):
        files.append(tmp_path / f"r{rank}.json")
        run(capsys, cfg_path, "--rank", rank, "--world-size", 2, "--take", 3, "--json", "--state-out", files[-1])
    out = run(capsys, cfg_path, "--rank", 2, "--world-size", 3, "--take", 2, "--json", "--state-in", *files)
    assert len(out) == 2 and out[0]["index"] == 0
    assert stream_job.main([str(cfg_path), "--rank", "0", "--world-size", "3", "--state-in", str(files[0])]) == 2
    assert "all old streams" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    """Two text datasets of 600 and 200 rows, one row group each, weighted 3:1 (the small-dataset case)."""
    root = tmp_path_factory.mktemp("small_sets")
    catalog = make_catalog(root, [tiny("big", "text_only", 600, rows_per_row_group=600, rows_per_file=600, seed=1),
                                  tiny("small", "text_only", 200, rows_per_row_group=200, rows_per_file=200, seed=2)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
text_only: {{dataset_names: {{a: [big], b: [small]}}, weight: {{a: 3, b: 1}}}}
train: {{expected_num_tokens: 1024, max_num_tokens: 1280, max_num_tokens_per_sample: 1024,
         prefer_buffer_before: 512, max_buffer_size: 4}}
""")


def test_three_ranks_share_small_datasets_without_repeats(small_sets, capsys):
    """No sample twice across 3 ranks until each rank has read floor(N/3) of that dataset (N = 600, 200)."""
    per_rank = [[s for r in run(capsys, small_sets, "--rank", rank, "--world-size", 3, "--take", 80, "--json")
                 for s in r["samples"]] for rank in range(3)]
    for name, rows in (("big", 600), ("small", 200)):
        firsts = [[s for s in samples if s.startswith(name + ":")][: rows // 3] for samples in per_rank]
        assert all(len(f) == rows // 3 for f in firsts)          # every rank got that far
        union = [s for f in firsts for s in f]
        assert len(set(union)) == len(union) == 3 * (rows // 3)
