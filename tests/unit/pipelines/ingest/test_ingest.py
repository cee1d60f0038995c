"""Ingest without Ray (executor="local", same process_chunk): bad inputs, counts, idempotence, atomicity.

The real Ray Data run over the shipped catalog is in test_ingest_ray.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_catalog.catalog import load_catalog
from datasets_catalog.plan import ImageSlot, ImageTokens, Message, build_plan, packed_length
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from pipelines.ingest import chunk as ingest_chunk
from pipelines.ingest.build import STATUS_BUILT, STATUS_FAILED, STATUS_UP_TO_DATE
from pipelines.ingest.driver import format_summary, run_ingest
from pipelines.storage.shard_schema import REJECTS_SCHEMA, SHARD_SCHEMA


def png(w: int, h: int, color=(120, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((w, h)).convert("RGB").save(buf, "JPEG", quality=80)
    return buf.getvalue()


def sft(path, text="<image>\nWhat is shown?", answer="A test image.", **image_fields):
    return json.dumps({"input_img": [{"path": path, **image_fields}],
                       "message": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]})


@pytest.fixture
def broken(tmp_path):
    """A data folder with good and bad images, and a JSONL where each bad line has one known problem."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "good.png").write_bytes(png(64, 48))
    (data / "sub" / "good.jpg").write_bytes(jpeg(300, 200))
    whole = png(64, 64, (1, 2, 3))
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])
    good_jpeg = jpeg(200, 100)
    (data / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) - 300])
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (data / "empty.png").write_bytes(b"")
    ihdr = b"IHDR" + (0).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    (data / "zero.png").write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr
                                    + zlib.crc32(ihdr).to_bytes(4, "big"))
    (data / "big.png").write_bytes(png(300, 300))
    (data / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(10, 10))
    os.symlink(outside, data / "link_out.png")
    os.symlink(data / "good.png", data / "link_in.png")
    lines = [
        (sft("good.png"), None),
        (b"{bad json", "json_invalid"),
        (sft("sub/good.jpg", width=300, height=200), None),
        (b'{"message": "caf\xe9"}', "not_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (json.dumps({"input_img": [{"path": "good.png"}]}), "field_missing"),
        (json.dumps({"input_img": [{"path": "good.png"}], "message": [{"from": "human", "value": 5}]}), "field_type"),
        (sft("good.png", text="What is shown?"), "image_tag_mismatch"),
        (sft("good.png", text="<image><image> Compare."), "image_tag_mismatch"),
        (sft("missing.png"), "image_missing"),
        (sft("../outside.png"), "path_escapes_data_dir"),
        (sft(str(outside)), "path_escapes_data_dir"),
        (sft("link_out.png"), "path_escapes_data_dir"),
        (sft("link_in.png"), None),
        (sft("/good.png"), None),                     # upstream strips the leading separator
        (sft(str(data / "good.png")), None),          # absolute, inside data_dir
        (sft("truncated.png"), "image_truncated"),
        (sft("truncated.jpg"), "image_truncated"),
        (sft("corrupt.png"), "image_corrupt"),
        (sft("empty.png"), "image_empty"),
        (sft("zero.png"), "image_empty"),
        (sft("big.png"), "image_too_large"),
        (sft("notes.txt"), "image_unsupported"),
        (sft("good.png", width=65, height=48), "size_mismatch"),
        (sft("good.png", answer=""), "no_loss_target"),
        (json.dumps({"message": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}),
         "image_count"),
        (b"", None),                                  # blank line: not a row
        (sft("good.png", answer="last good line"), None),
    ]
    jsonl = tmp_path / "broken.jsonl"
    with open(jsonl, "wb") as f:
        for text, _ in lines:
            f.write((text if isinstance(text, bytes) else text.encode()) + b"\n")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("""\
output_dir: out
max_image_pixels: 80000
max_reject_fraction: 1.0
rows_per_shard: 4
datasets:
  - name: broken
    task: sft
    jsonl_path: broken.jsonl
    data_dir: data
""")
    expected = {i + 1: reason for i, (text, reason) in enumerate(lines) if text != b""}
    return load_catalog(catalog), expected, data


def test_every_bad_input_lands_in_rejects_and_the_rest_ingests(broken):
    catalog, expected, data = broken
    report = run_ingest(catalog, executor="local", progress=False, log=lambda m: None)
    folder = catalog.output_dir / "broken"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rejects = pq.read_table(folder / "_rejects.parquet")
    assert rejects.schema.equals(REJECTS_SCHEMA)
    got = {row["line_number"]: row["reason"] for row in rejects.to_pylist()}
    assert got == {line: reason for line, reason in expected.items() if reason}
    for row in rejects.to_pylist():
        assert len(row["detail"]) > 20 and row["raw"]
    not_utf8 = [r for r in rejects.to_pylist() if r["reason"] == "not_utf8"][0]
    assert "caf" in not_utf8["raw"]

    frame = pd.read_parquet(folder)
    good = sorted(line for line, reason in expected.items() if reason is None)
    assert sorted(frame["line_number"]) == good
    assert manifest["rows_read"] == len(expected) == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["blank_lines"] == 1 and manifest["rows_written"] == len(good)
    assert sum(manifest["rejects_by_reason"].values()) == manifest["rows_rejected"]
    assert [d.status for d in report.datasets] == [STATUS_BUILT]
    assert "image_truncated" in format_summary(report)

    table = pq.read_table(folder)
    assert table.schema.equals(SHARD_SCHEMA)
    row = frame.set_index("line_number").loc[good[1]]
    image = row["input_images"][0]
    raw = (data / "sub" / "good.jpg").read_bytes()
    assert image["path"] == "sub/good.jpg" and image["bytes"] == raw
    assert image["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (image["width"], image["height"], image["format"]) == (300, 200, "JPEG")
    # by hand (tests/unit/datasets_catalog/test_transforms.py shows the steps): VAE s = 512/200 = 2.56 -> 768x512;
    # ViT s = 378/200 = 1.89 -> 567.0 / 14 = 40.5 -> banker's 40 -> 560 x 378
    assert (image["vae_width"], image["vae_height"], image["vae_tokens"]) == (768, 512, 48 * 32)
    assert (image["vit_width"], image["vit_height"], image["vit_tokens"]) == (560, 378, 40 * 27)
    paths = [frame.set_index("line_number").loc[line]["input_images"][0]["path"] for line in good[2:5]]
    assert paths == ["link_in.png", "good.png", "good.png"]   # symlink inside, "/good.png", absolute inside
    assert manifest["shards"] and all((folder / s["file"]).exists() for s in manifest["shards"])
    assert sum(s["rows"] for s in manifest["shards"]) == len(frame)


def test_num_tokens_is_the_packed_length(broken):
    catalog, _, _ = broken
    run_ingest(catalog, executor="local", progress=False, log=lambda m: None)
    frame = pd.read_parquet(catalog.output_dir / "broken")
    tok = TextTokenizer.builtin()
    kind = resolve_task_kind("sft")
    for _, row in frame.iterrows():
        messages = [Message(m["from"], m["value"]) for m in row["messages"]]
        plan = build_plan(kind, messages, len(row["input_images"]), 0)
        texts = [len(tok.encode(i.text)) for i in plan.items if i.type == "text"]
        images = {ImageSlot("input", i): ImageTokens(im["vae_tokens"], im["vit_tokens"])
                  for i, im in enumerate(row["input_images"])}
        assert row["num_tokens"] == packed_length(plan, texts, images)
        assert row["text_tokens"] == sum(texts)
        # content + 2 markers per element: vit(w/14*h/14) + question + answer
        image = row["input_images"][0]
        assert row["num_tokens"] == image["vit_tokens"] + sum(texts) + 2 * len(plan.items)
    # The same numbers written out by hand. The builtin tokenizer gives one token per UTF-8 byte:
    # "What is shown?" 14, "A test image." 13, "last good line" 14. good.png is 64x48: ViT s = 378/48 = 7.875
    # -> 504 x 378 -> 36 * 27 = 972 patches; sub/good.jpg 300x200 -> 560 x 378 -> 40 * 27 = 1080.
    # An sft sample is [ViT image, question, answer]: 3 elements, 2 markers each (docs/upstream-compat.md#pack-membership).
    by_line = frame.set_index("line_number")
    assert (by_line.loc[1, "num_tokens"], by_line.loc[1, "text_tokens"]) == (972 + 14 + 13 + 6, 27)
    assert (by_line.loc[3, "num_tokens"], by_line.loc[3, "text_tokens"]) == (1080 + 14 + 13 + 6, 27)
    last = max(by_line.index)
    assert (by_line.loc[last, "num_tokens"], by_line.loc[last, "text_tokens"]) == (972 + 14 + 14 + 6, 28)


def test_reference_images_store_paths_only(broken):
    catalog, _, _ = broken
    run_ingest(catalog, executor="local", progress=False, reference_images=True, log=lambda m: None)
    frame = pd.read_parquet(catalog.output_dir / "broken")
    images = [im for ims in frame["input_images"] for im in ims]
    assert images and all(im["bytes"] is None and im["sha256"] for im in images)


def test_reject_threshold_fails_the_dataset(broken, tmp_path):
    catalog, _, _ = broken
    text = catalog.path.read_text().replace("max_reject_fraction: 1.0", "max_reject_fraction: 0.3")
    catalog.path.write_text(text)
    catalog = load_catalog(catalog.path)
    report = run_ingest(catalog, executor="local", progress=False, log=lambda m: None)
    assert not report.ok and report.datasets[0].status == STATUS_FAILED
    assert not (catalog.output_dir / "broken").exists()
    failed = catalog.output_dir / "_failed" / "broken"
    assert (failed / "_rejects.parquet").exists()
    assert json.loads((failed / "_manifest.json").read_text())["status"] == "failed"
    assert "max_reject_fraction" in report.datasets[0].message
    # A failed dataset is never "up to date": the next run tries again.
    again = run_ingest(catalog, executor="local", progress=False, log=lambda m: None)
    assert again.datasets[0].status == STATUS_FAILED


@pytest.fixture
def small(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(png(40 + i, 30))
    (tmp_path / "d.jsonl").write_text("".join(sft(f"{i}.png") + "\n" for i in range(3)))
    (tmp_path / "t.jsonl").write_text(json.dumps({"message": [{"from": "human", "value": "q"},
                                                               {"from": "gpt", "value": "a"}]}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nrows_per_shard: 2\ndatasets:\n"
                    "  - {name: d, task: sft, jsonl_path: d.jsonl, data_dir: data}\n"
                    "  - {name: t, task: text_only, jsonl_path: t.jsonl}\n")
    return path


def _run(path, **kw):
    return run_ingest(load_catalog(path), executor="local", progress=False, log=lambda m: None, **kw)


def _status(report):
    return {d.name: d.status for d in report.datasets}


def test_idempotent_and_rebuilds_on_change(small):
    first = _run(small)
    assert _status(first) == {"d": STATUS_BUILT, "t": STATUS_BUILT}
    out = small.parent / "out"
    manifest = json.loads((out / "d" / "_manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet"]
    stamp = (out / "d" / "part-00000.parquet").stat().st_mtime_ns

    messages = []
    second = run_ingest(load_catalog(small), executor="local", progress=False, log=messages.append)
    assert _status(second) == {"d": STATUS_UP_TO_DATE, "t": STATUS_UP_TO_DATE}
    assert any("up to date" in m for m in messages)
    assert (out / "d" / "part-00000.parquet").stat().st_mtime_ns == stamp

    # Touching the JSONL without changing its bytes does no work either, and the new mtime is remembered.
    os.utime(small.parent / "d.jsonl", ns=(time.time_ns(), time.time_ns()))
    assert _status(_run(small))["d"] == STATUS_UP_TO_DATE
    manifest = json.loads((out / "d" / "_manifest.json").read_text())
    assert manifest["source"]["mtime_ns"] == (small.parent / "d.jsonl").stat().st_mtime_ns

    with open(small.parent / "d.jsonl", "a") as f:      # changed JSONL
        f.write(sft("0.png") + "\n")
    third = _run(small)
    assert _status(third) == {"d": STATUS_BUILT, "t": STATUS_UP_TO_DATE}
    assert len(pd.read_parquet(out / "d")) == 4

    (small.parent / "data" / "1.png").write_bytes(png(50, 30))   # changed image folder
    assert _status(_run(small))["d"] == STATUS_BUILT
    assert sorted(pd.read_parquet(out / "d")["input_images"].map(lambda x: x[0]["width"])) == [40, 40, 42, 50]

    text = small.read_text().replace("data_dir: data}", "data_dir: data, image_transform_args: "
                                                         "{max_image_size: 512, min_image_size: 256}}")
    small.write_text(text)                                       # changed transform
    assert _status(_run(small)) == {"d": STATUS_BUILT, "t": STATUS_UP_TO_DATE}
    assert set(pd.read_parquet(out / "d")["input_images"].map(lambda x: x[0]["vae_height"])) == {256}  # short side

    stamp = (out / "d" / "part-00000.parquet").stat().st_mtime_ns
    small.write_text(small.read_text().replace("{name: d, task: sft,", "{name: d, task: sft, split: val,"))
    assert _status(_run(small))["d"] == STATUS_UP_TO_DATE                # metadata only: manifest updated
    assert json.loads((out / "d" / "_manifest.json").read_text())["split"] == "val"
    assert (out / "d" / "part-00000.parquet").stat().st_mtime_ns == stamp

    assert _status(_run(small, force=True)) == {"d": STATUS_BUILT, "t": STATUS_BUILT}
    assert _status(_run(small, only=["t"])) == {"t": STATUS_UP_TO_DATE}


def test_interrupted_run_never_publishes_a_partial_dataset(small, monkeypatch):
    _run(small)
    out = small.parent / "out"
    before = (out / "d" / "_manifest.json").read_text()
    with open(small.parent / "d.jsonl", "a") as f:
        f.write(sft("2.png") + "\n")
    real = ingest_chunk.process_chunk
    calls = []

    def dies_on_second_chunk(task):
        calls.append(task.chunk_index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr("pipelines.ingest.driver.process_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(small)
    assert (out / "d" / "_manifest.json").read_text() == before     # the old complete version is intact
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
    monkeypatch.setattr("pipelines.ingest.driver.process_chunk", real)
    assert _status(_run(small))["d"] == STATUS_BUILT
    assert len(pd.read_parquet(out / "d")) == 4


def test_stale_staging_folders_are_removed(small):
    out = small.parent / "out"
    (out / ".staging-d-999999999").mkdir(parents=True)
    (out / ".staging-d-999999999" / "part-00000.parquet").write_bytes(b"half")
    _run(small)
    assert not (out / ".staging-d-999999999").exists()
    assert pd.read_parquet(out / "d").shape[0] == 3


def test_all_rejected_dataset_still_reads_as_an_empty_frame(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "d.jsonl").write_text(sft("missing.png") + "\n")
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nmax_reject_fraction: 1\ndatasets:\n"
                    "  - {name: d, task: sft, jsonl_path: d.jsonl, data_dir: data}\n")
    _run(path)
    frame = pd.read_parquet(tmp_path / "out" / "d")
    assert len(frame) == 0 and list(frame.columns) == SHARD_SCHEMA.names


def test_cli_reports_up_to_date_without_starting_ray(small):
    _run(small)
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[4]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "ingest.py"), str(small), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and {d["status"] for d in report["datasets"]} == {STATUS_UP_TO_DATE}
    assert "starting a local Ray" not in proc.stderr and "up to date" in proc.stderr
    table = subprocess.run([sys.executable, str(root / "jobs" / "ingest.py"), str(small)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "TOTAL" in table.stdout and "up to date" in table.stdout


def test_kinds_with_a_length_limit_are_the_ones_covered_below():
    # upstream skips counterfactual samples over 18,000 content tokens (docs/upstream-compat.md#sequence-plans);
    # a new limit on another kind needs its own case in test_too_long_is_rejected_and_counted
    from datasets_catalog.task_kinds import TASK_KINDS
    assert {k.name: k.max_content_tokens for k in TASK_KINDS if k.max_content_tokens} == {"counterfactual": 18000}


def test_too_long_is_rejected_and_counted(tmp_path):
    """The one length limit (counterfactual, 18,000 content tokens) at its boundary, through the local ingest:
    the reject row, `rejects_by_reason` and the row counts of the manifest."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(png(16, 16))
    (data / "b.png").write_bytes(png(16, 16, (9, 9, 9)))
    # 16x16 by hand: VAE s = 512/16 = 32 -> 512x512 -> 32 * 32 = 1024 latents; ViT s = 378/16 -> 378x378 ->
    # 27 * 27 = 729 patches. Counterfactual plan: source VAE 1024 + source ViT 729 + instruction + target VAE
    # 1024 + explanation "A test image." (13 bytes) = 2790 + instruction bytes: 15,210 bytes -> exactly 18,000.
    def record(n):
        return json.dumps({"input_img": [{"path": "a.png"}], "output_img": [{"path": "b.png"}],
                           "message": [{"from": "human", "value": "<image>\n" + "a" * n},
                                       {"from": "gpt", "value": "A test image."}]})
    (tmp_path / "cf.jsonl").write_text("\n".join([record(15210), record(15211), record(20000), record(10)]) + "\n")
    (tmp_path / "catalog.yaml").write_text("output_dir: out\nmax_reject_fraction: 1.0\ndatasets:\n"
                                           "  - name: cf\n    task: counterfactual\n    jsonl_path: cf.jsonl\n"
                                           "    data_dir: data\n")
    catalog = load_catalog(tmp_path / "catalog.yaml")
    report = run_ingest(catalog, executor="local", progress=False, log=lambda m: None)
    folder = catalog.output_dir / "cf"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rejects = pq.read_table(folder / "_rejects.parquet").to_pylist()
    assert [(r["line_number"], r["reason"]) for r in rejects] == [(2, "too_long"), (3, "too_long")]
    assert "18001 tokens, over the 18000" in rejects[0]["detail"]
    assert manifest["rejects_by_reason"] == {"too_long": 2}
    assert (manifest["rows_read"], manifest["rows_written"], manifest["rows_rejected"]) == (4, 2, 2)
    assert report.datasets[0].rejects_by_reason == {"too_long": 2}
    frame = pd.read_parquet(folder).set_index("line_number")
    # 5 elements, 2 markers each: 18,000 + 10 and 2790 + 10 + 10
    assert sorted(frame.index) == [1, 4]
    assert (frame.loc[1, "num_tokens"], frame.loc[4, "num_tokens"]) == (18010, 2810)
