"""Inputs that used to abort, hang or exhaust the ingest (executor="local", the same process_chunk as Ray):
each one ends as a reject of its own line with a stable reason, the clean datasets of the catalog are
published, and `rows_read == rows_written + rows_rejected`. The Ray Data run is in
tests/integration/pipelines/ingest/test_ingest_isolation_ray.py.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from PIL import Image

from datasets_catalog.catalog import load_catalog
from datasets_catalog.records import MAX_JSON_DEPTH, REASONS, RecordError, decode_line
from pipelines.ingest import image_cache
from pipelines.ingest.build import STATUS_BUILT, STATUS_UP_TO_DATE
from pipelines.ingest.driver import format_summary, run_ingest


def png(w: int, h: int, color=(120, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def sft(path, answer="A test image.", **extra) -> str:
    return json.dumps({"input_img": [{"path": path}], **extra,
                       "message": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                   {"from": "gpt", "value": answer}]})


def hostile_lines(data: Path) -> list[tuple[bytes, str | None]]:
    """(line, expected reason or None for a clean line). Expected reasons follow the issue, not the code."""
    deep = "[" * 10_000 + "]" * 10_000
    return [
        (sft("good.png").encode(), None),
        (deep.encode(), "json_too_deep"),                                               # a bare deep array
        (sft("good.png", unused=json.loads("[" * 50 + "]" * 50)).encode(), None),      # deep-ish but allowed
        (sft("good.png")[:-1].encode() + b', "unused": ' + deep.encode() + b"}", "json_too_deep"),
        (sft("good.png", answer="x").replace('"x"', '"\\ud800"').encode(), "text_invalid_unicode"),
        (sft("good.png", answer="x").replace('"x"', '"\\ud83d\\ude00"').encode(), None),   # a valid pair
        (sft("go\u0000od.png").encode(), "path_invalid"),
        (sft("fifo.png").encode(), "image_not_regular_file"),
        (sft("sparse.png").encode(), "image_too_big"),
        (sft("folder.png").encode(), "image_not_regular_file"),
        (sft(str(data.parent / "link" / "good.png")).encode(), None),   # absolute, through the symlinked data_dir
        (sft(str(data.parent / "link" / ".." / "outside.png")).encode(), "path_escapes_data_dir"),
        (sft("/etc/hostname").encode(), "path_escapes_data_dir"),
        (sft("good.png").encode(), None),
    ]


@pytest.fixture
def hostile(tmp_path):
    """A catalog with one clean dataset and one dataset of hostile lines (BOM first, FIFO, sparse file...)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes(png(40, 30))
    (tmp_path / "outside.png").write_bytes(png(10, 10))
    os.mkfifo(data / "fifo.png")
    with open(data / "sparse.png", "wb") as f:          # 600 MB on paper, a few KB on disk
        f.write(png(8, 8)[:64])
        f.truncate(600 * 1024 * 1024)
    (data / "folder.png").mkdir()
    os.symlink(data, tmp_path / "link")
    lines = hostile_lines(data)
    (tmp_path / "hostile.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw for raw, _ in lines) + b"\n")
    (tmp_path / "clean.jsonl").write_text(sft("good.png") + "\n" + sft("good.png", answer="Another.") + "\n")
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\nmax_reject_fraction: 0.9\ndatasets:\n"
        "  - {name: hostile, task: sft, jsonl_path: hostile.jsonl, data_dir: link}\n"
        "  - {name: clean, task: sft, jsonl_path: clean.jsonl, data_dir: data}\n")
    return tmp_path, lines


def test_hostile_lines_are_rejects_and_the_clean_dataset_is_published(hostile):
    root, lines = hostile
    started = time.monotonic()
    report = run_ingest(load_catalog(root / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    assert time.monotonic() - started < 60
    by_name = {d.name: d for d in report.datasets}
    assert by_name["clean"].status == STATUS_BUILT and by_name["clean"].rows_written == 2
    hostile_report = by_name["hostile"]
    assert hostile_report.status == STATUS_BUILT
    assert hostile_report.rows_read == len(lines) == hostile_report.rows_written + hostile_report.rows_rejected
    rejects = pd.read_parquet(root / "out" / "hostile" / "_rejects.parquet")
    expected = {i + 1: reason for i, (_, reason) in enumerate(lines) if reason is not None}
    assert dict(zip(rejects["line_number"], rejects["reason"])) == expected
    rows = pd.read_parquet(root / "out" / "hostile")
    assert sorted(rows["line_number"]) == [i + 1 for i, (_, r) in enumerate(lines) if r is None]
    assert rows["input_images"].iloc[0][0]["bytes"] == (root / "data" / "good.png").read_bytes()   # BOM line 1 kept
    assert set(rows.loc[rows["line_number"] == 11, "input_images"].iloc[0][0]["path"].split("/")) == {"good.png"}
    summary = format_summary(report)
    assert "json_too_deep 2: line 2:" in summary and "_rejects.parquet" in summary


def test_surrogate_and_depth_never_reach_the_tokenizer():
    # a lone surrogate used to raise UnicodeEncodeError in count_tokens for the whole chunk
    with pytest.raises(RecordError) as info:
        decode_line(b'{"message": [{"from": "gpt", "value": "\\udfff"}]}')
    assert info.value.reason == "text_invalid_unicode"
    with pytest.raises(RecordError) as info:
        decode_line(b'{"a": ' + b"{" * 5000 + b"}" * 5000 + b"}")
    assert info.value.reason == "json_too_deep"
    # brackets inside strings are text, not nesting
    assert decode_line(json.dumps({"a": "[" * 1000}).encode()) == {"a": "[" * 1000}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hst.binary(max_size=200) | hst.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_decode_line_returns_an_object_or_a_known_reason(raw):
    try:
        obj = decode_line(raw)
    except RecordError as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(obj, dict)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")   # whatever passes can be written as UTF-8


@settings(max_examples=60, deadline=None)
@given(hst.integers(min_value=2, max_value=3 * MAX_JSON_DEPTH))
def test_depth_limit_is_exact(depth):
    raw = b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"   # the object itself is level 1
    if depth <= MAX_JSON_DEPTH:
        assert decode_line(raw)["a"] is not None
    else:
        with pytest.raises(RecordError) as info:
            decode_line(raw)
        assert info.value.reason == "json_too_deep"


def test_a_record_that_raises_unexpectedly_is_an_internal_error_reject(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes(png(20, 20))
    (tmp_path / "a.jsonl").write_text("\n".join([sft("good.png"), sft("good.png", answer="boom"), sft("good.png")]))
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\ndatasets:\n  - {name: a, task: sft, jsonl_path: a.jsonl, data_dir: data}\n")
    from pipelines.ingest import chunk

    real = chunk.parse_record

    def flaky(obj, kind, mapping=None):
        if obj["message"][1]["value"] == "boom":
            raise ZeroDivisionError("division by zero")
        return real(obj, kind, mapping)

    monkeypatch.setattr(chunk, "parse_record", flaky)
    report = run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    d = report.datasets[0]
    assert (d.rows_read, d.rows_written, d.rows_rejected) == (3, 2, 1)
    rejects = pd.read_parquet(tmp_path / "out" / "a" / "_rejects.parquet")
    assert rejects["reason"].tolist() == ["internal_error"]
    assert "ZeroDivisionError" in rejects["detail"][0] and "division by zero" in rejects["detail"][0]


def test_a_chunk_that_fails_twice_becomes_worker_failed_rejects(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes(png(20, 20))
    (tmp_path / "a.jsonl").write_text("\n".join(sft("good.png") for _ in range(5)) + "\n")
    (tmp_path / "b.jsonl").write_text(sft("good.png") + "\n")
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\nrows_per_shard: 2\ndatasets:\n"
        "  - {name: a, task: sft, jsonl_path: a.jsonl, data_dir: data, max_reject_fraction: 1.0}\n"
        "  - {name: b, task: sft, jsonl_path: b.jsonl, data_dir: data}\n")
    from pipelines.ingest import driver

    calls: list[int] = []
    real = driver.process_chunk

    def dies_on_chunk_1(task):
        calls.append(task.chunk_index)
        if task.dataset == "a" and task.chunk_index == 1:
            (Path(task.staging_dir) / "chunk-00001.parquet").write_bytes(b"half")   # what a dead worker leaves
            raise MemoryError("simulated")
        return real(task)

    driver.process_chunk = dies_on_chunk_1
    try:
        report = run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False,
                            log=lambda m: None)
    finally:
        driver.process_chunk = real
    assert calls.count(1) == 2   # a's chunk 1: the first try and one retry
    a = {d.name: d for d in report.datasets}["a"]
    assert (a.rows_read, a.rows_written, a.rows_rejected) == (5, 3, 2)
    assert a.rejects_by_reason == {"worker_failed": 2}
    assert sorted(os.listdir(tmp_path / "out" / "a")) == [".huggingface.yaml", "_manifest.json", "_rejects.parquet",
                                                          "part-00000.parquet", "part-00001.parquet"]
    assert pd.read_parquet(tmp_path / "out" / "a")["line_number"].tolist() == [1, 2, 5]
    assert {d.name: d.status for d in report.datasets}["b"] == STATUS_BUILT


# -- the up-to-date check trusts content -------------------------------------------------------------------

@pytest.fixture
def built(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes(png(20, 20))
    (tmp_path / "a.jsonl").write_text("\n".join(sft("good.png", answer=f"answer {i}.") for i in range(4)) + "\n")
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\nrows_per_shard: 2\ndatasets:\n  - {name: a, task: sft, jsonl_path: a.jsonl, data_dir: data}\n")

    def run(**kw):
        messages: list[str] = []
        report = run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False,
                            log=messages.append, **kw)
        return report.datasets[0], messages

    assert run()[0].status == STATUS_BUILT
    assert run()[0].status == STATUS_UP_TO_DATE
    return tmp_path, run


def test_a_truncated_shard_is_rebuilt(built):
    root, run = built
    part = root / "out" / "a" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    d, messages = run()
    assert d.status == STATUS_BUILT and any("part-00001.parquet has 100 bytes" in m for m in messages)
    assert len(pd.read_parquet(root / "out" / "a")) == 4


def test_a_deleted_shard_is_rebuilt(built):
    root, run = built
    (root / "out" / "a" / "part-00000.parquet").unlink()
    d, messages = run()
    assert d.status == STATUS_BUILT and any("part-00000.parquet is missing" in m for m in messages)
    assert run()[0].status == STATUS_UP_TO_DATE


def test_a_same_size_same_mtime_edit_is_seen(built):
    root, run = built
    path = root / "a.jsonl"
    before = path.stat()
    path.write_text(path.read_text().replace("answer 1.", "answer 7."))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    d, messages = run(fast_check=True)   # the documented shortcut misses it...
    assert d.status == STATUS_UP_TO_DATE
    d, messages = run()                  # ...the default check does not
    assert d.status == STATUS_BUILT and any("content changed" in m for m in messages)
    assert "answer 7." in pd.read_parquet(root / "out" / "a")["messages"].iloc[1][1]["value"]


# -- each distinct image once -----------------------------------------------------------------------------

def test_each_distinct_image_is_probed_once_and_stored_once_per_row_group(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    images = {f"img{i}.png": Image.effect_noise((96, 96), 60 + i).convert("RGB") for i in range(3)}
    for name, image in images.items():
        image.save(data / name)
    lines = [sft(name, answer=f"Question {q} about {name}.") for name in images for q in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\ndatasets:\n  - {name: a, task: sft, jsonl_path: a.jsonl, data_dir: data}\n")
    from pipelines.ingest import chunk

    probed: list[str] = []
    real = chunk.probe_image

    def counting(path, *args, **kwargs):
        probed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(chunk, "probe_image", counting)
    image_cache.PROBES.clear()
    image_cache.STRUCTS.clear()
    run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    assert sorted(probed) == sorted(images)   # 30 records, 3 probes
    distinct = sum((data / name).stat().st_size for name in images)
    part = tmp_path / "out" / "a" / "part-00000.parquet"
    assert part.stat().st_size < 1.3 * distinct + 20_000   # the rest: messages, metadata, footer
    rows = pd.read_parquet(tmp_path / "out" / "a")
    assert len(rows) == 30
    for _, row in rows.iterrows():
        image = row["input_images"][0]
        assert image["bytes"] == (data / image["path"]).read_bytes()
    import duckdb
    from datasets import load_dataset

    sizes = duckdb.sql(f"SELECT octet_length(input_images[1].bytes) FROM read_parquet('{part}') "
                       f"ORDER BY line_number").fetchall()
    assert [s for (s,) in sizes] == [(data / name).stat().st_size for name in images for _ in range(10)]
    hf = load_dataset("parquet", data_files=str(part), split="train", cache_dir=str(tmp_path / "hf"))
    assert hf[25]["input_images"][0]["bytes"] == (data / "img2.png").read_bytes()
    column = pq.ParquetFile(part).metadata.row_group(0)
    paths = {column.column(i).path_in_schema: column.column(i) for i in range(column.num_columns)}
    assert "RLE_DICTIONARY" in paths["input_images.list.element.bytes"].encodings


def test_an_edited_image_is_probed_again(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.png").write_bytes(png(20, 20))
    (tmp_path / "a.jsonl").write_text(sft("x.png") + "\n")
    (tmp_path / "catalog.yaml").write_text(
        "output_dir: out\ndatasets:\n  - {name: a, task: sft, jsonl_path: a.jsonl, data_dir: data}\n")
    run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    (data / "x.png").write_bytes(png(30, 10))
    run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    image = pd.read_parquet(tmp_path / "out" / "a")["input_images"].iloc[0][0]
    assert (image["width"], image["height"]) == (30, 10)
