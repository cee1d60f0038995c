"""One chunk of ingest work (`process_chunk`, `failed_chunk`, `iter_lines`) called directly, with the counts,
row groups, file names and reject messages written out by hand.

Numbers used throughout (by hand; tests/unit/datasets_catalog/test_transforms.py shows the rule's steps): a
16x16 PNG becomes a 512x512 VAE image (s = 512/16 = 32; 32 * 32 = 1024 latents) and a 378x378 ViT image
(27 * 27 = 729 patches). The builtin tokenizer counts one token per UTF-8 byte, and an sft sample is
[ViT image, question, answer]: 3 elements, 2 markers each (docs/upstream-compat.md#pack-membership).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.ingest import chunk as ingest_chunk
from pipelines.ingest import image_cache
from pipelines.ingest.chunk import ChunkResult, ChunkTask, failed_chunk, internal, iter_lines, process_chunk, \
    write_rejects

VAE = {"max_image_size": 1024, "min_image_size": 512, "image_stride": 16}
VIT = {"max_image_size": 980, "min_image_size": 378, "image_stride": 14}
TAIL = "; this line was skipped, the rest of the run went on (report it with the line)"


def png(w: int, h: int, color=(120, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def sft(path: str = "a.png", question: str = "What?", answer: str = "Yes.", **image) -> str:
    return json.dumps({"input_img": [{"path": path, **image}],
                       "message": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})


@pytest.fixture(autouse=True)
def fresh_caches():
    image_cache.PROBES.clear()
    image_cache.STRUCTS.clear()
    yield
    image_cache.PROBES.clear()
    image_cache.STRUCTS.clear()


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(png(16, 16))
    (data / "b.png").write_bytes(png(16, 16, (9, 9, 9)))
    (tmp_path / "staging").mkdir()
    return tmp_path


def make_task(folder: Path, lines: bytes, **kw) -> ChunkTask:
    (folder / "a.jsonl").write_bytes(lines)
    args = dict(dataset="d", task="sft", jsonl_path=str(folder / "a.jsonl"), data_dir=str(folder / "data"), offset=0,
                length=len(lines), first_line=1, chunk_index=7, staging_dir=str(folder / "staging"),
                image_transform_args=VAE, vit_image_transform_args=VIT, max_image_pixels=10_000_000)
    args.update(kw)
    return ChunkTask(**args)


def rows_of(folder: Path, result: ChunkResult) -> list[dict]:
    return pq.read_table(folder / "staging" / result.shard_file).to_pylist()


def rejects_of(folder: Path, result: ChunkResult) -> list[tuple[int, str, str]]:
    return [(r["line_number"], r["reason"], r["detail"])
            for r in pq.read_table(folder / "staging" / result.rejects_file).to_pylist()]


def test_counts_names_and_rows_of_one_chunk(folder):
    lines = (b"\xef\xbb\xbf" + sft().encode() + b"\r\n\n{bad json\n" + sft(answer="No, it is not.").encode() + b"\n"
             + sft("b.png", question="Which?").encode())
    result = process_chunk(make_task(folder, lines))
    image = len(png(16, 16))
    # text tokens: "What?" 5 + "Yes." 4 = 9; "What?" 5 + "No, it is not." 14 = 19; "Which?" 6 + "Yes." 4 = 10
    assert (result.rows_read, result.rows_written, result.samples_written, result.rows_rejected,
            result.blank_lines) == (4, 3, 3, 1, 1)
    assert (result.images, result.image_bytes) == (3, 2 * image + len(png(16, 16, (9, 9, 9))))
    assert (result.text_tokens, result.num_tokens) == (9 + 19 + 10, 3 * (729 + 6) + 9 + 19 + 10)
    assert result.reasons == {"json_invalid": 1} and result.examples["json_invalid"][0] == 3
    assert (result.shard_file, result.rejects_file) == ("chunk-00007.parquet", "_rejects-00007.parquet")
    assert result.shard_bytes == (folder / "staging" / "chunk-00007.parquet").stat().st_size
    assert result.seconds > 0 and (result.dataset, result.chunk_index) == ("d", 7)
    rows = rows_of(folder, result)
    assert [(r["sample_id"], r["line_number"], r["task"], r["text_tokens"], r["num_tokens"]) for r in rows] == [
        ("d:1", 1, "sft", 9, 729 + 9 + 6), ("d:4", 4, "sft", 19, 729 + 19 + 6), ("d:5", 5, "sft", 10, 729 + 10 + 6)]
    assert rows[0]["messages"] == [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Yes."}]
    assert rows[0]["extra"] is None and rows[0]["output_images"] == []
    struct = rows[0]["input_images"][0]
    assert {k: struct[k] for k in ("path", "width", "height", "format", "vae_width", "vae_height", "vae_tokens",
                                   "vit_width", "vit_height", "vit_tokens", "meta")} == {
        "path": "a.png", "width": 16, "height": 16, "format": "PNG", "vae_width": 512, "vae_height": 512,
        "vae_tokens": 1024, "vit_width": 378, "vit_height": 378, "vit_tokens": 729, "meta": None}
    assert struct["bytes"] == png(16, 16)
    [(line, reason, _)] = rejects_of(folder, result)
    assert (line, reason) == (3, "json_invalid")
    assert ChunkTask(**make_task(folder, lines).to_dict()) == make_task(folder, lines)
    assert result.to_dict()["rows_read"] == 4


def test_extra_fields_are_kept_as_sorted_json(folder):
    line = json.loads(sft())
    line.update(zeta="ü", alpha=1)
    result = process_chunk(make_task(folder, json.dumps(line).encode() + b"\n"))
    assert rows_of(folder, result)[0]["extra"] == '{"alpha": 1, "zeta": "ü"}'


def test_first_line_and_offset_number_the_lines(folder):
    first, second = sft().encode() + b"\n", sft(answer="Other.").encode() + b"\n"
    result = process_chunk(make_task(folder, first + second, offset=len(first), length=len(second), first_line=2))
    assert [r["sample_id"] for r in rows_of(folder, result)] == ["d:2"] and result.rows_read == 1


def test_iter_lines_strips_bom_crlf_and_the_final_newline(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\n\nc")
    assert list(iter_lines(str(path), 0, 100)) == [b"a", b"b", b"", b"c"]
    path.write_bytes(b"x\n\xef\xbb\xbfy\n")
    assert list(iter_lines(str(path), 2, 100)) == [b"\xef\xbb\xbfy"]      # a BOM is special only at byte 0
    assert list(iter_lines(str(path), 0, 2)) == [b"x"]
    path.write_bytes(b"\n")
    assert list(iter_lines(str(path), 0, 1)) == [b""]


@pytest.mark.parametrize("rows, nbytes, same_image, groups", [
    (2, 1 << 30, False, [2, 2, 1]),       # by rows: 5 rows in groups of 2
    (100, "one", False, [1, 1, 1, 1, 1]),  # by bytes: each image reaches the limit (>=) alone
    (100, "two", False, [2, 2, 1]),        # two distinct images reach it, one does not
    (100, "two", True, [5]),               # the same image counts once per group: never reaches the limit
])
def test_row_groups_close_by_rows_or_distinct_image_bytes(folder, rows, nbytes, same_image, groups):
    for i in range(5):
        (folder / "data" / f"i{i}.png").write_bytes(png(16, 16, (i, i, i)))
    sizes = [len(png(16, 16, (i, i, i))) for i in range(5)] if not same_image else [len(png(16, 16))]
    limit = {"one": min(sizes), "two": max(sizes) + 1}.get(nbytes, nbytes)
    lines = "\n".join(sft("a.png" if same_image else f"i{i}.png", answer=f"Answer {i}.") for i in range(5))
    result = process_chunk(make_task(folder, lines.encode(), row_group_rows=rows, row_group_bytes=limit))
    meta = pq.ParquetFile(folder / "staging" / result.shard_file).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups
    assert result.rows_written == result.samples_written == 5


def test_reference_images_store_no_bytes(folder):
    result = process_chunk(make_task(folder, (sft() + "\n" + sft("b.png")).encode(), reference_images=True))
    assert (result.images, result.image_bytes) == (2, 0)
    assert [r["input_images"][0]["bytes"] for r in rows_of(folder, result)] == [None, None]


def test_cached_image_structs_follow_the_settings(folder):
    process_chunk(make_task(folder, sft().encode()))
    small = dict(VAE, min_image_size=256)   # 16x16: s = 256/16 = 16 -> 256x256 -> 16 * 16 = 256 latents
    result = process_chunk(make_task(folder, sft().encode(), image_transform_args=small))
    assert rows_of(folder, result)[0]["input_images"][0]["vae_tokens"] == 256
    result = process_chunk(make_task(folder, sft().encode(), reference_images=True))
    assert rows_of(folder, result)[0]["input_images"][0]["bytes"] is None
    result = process_chunk(make_task(folder, sft().encode(), max_image_pixels=255))    # 256 pixels: over
    assert result.reasons == {"image_too_large": 1}


@pytest.mark.parametrize("declared", [(17, 16), (16, 15)])
def test_declared_size_must_match_fresh_or_cached(folder, declared):
    w, h = declared
    message = f"input_img[0] 'a.png' declares {w}x{h} but the file is 16x16; fix or drop width/height"
    lines = "\n".join([sft(width=w, height=h), sft(), sft(width=w, height=h), sft(width=16, height=16)])
    result = process_chunk(make_task(folder, lines.encode()))
    assert rejects_of(folder, result) == [(1, "size_mismatch", message), (3, "size_mismatch", message)]
    assert result.rows_written == 2 and result.reasons == {"size_mismatch": 2}
    assert result.examples == {"size_mismatch": [1, message]}


def test_images_without_a_data_dir_are_a_reject(folder):
    result = process_chunk(make_task(folder, sft().encode(), data_dir=None))
    assert rejects_of(folder, result) == [(1, "field_type", "this record names images but the dataset has no "
                                                            "data_dir; add data_dir to the catalog entry")]
    assert result.shard_file is None and result.shard_bytes == 0


class FlakyTokenizer:
    """Counts UTF-8 bytes; fails on any text containing BOOM (and on every batch that holds one)."""

    def count_tokens(self, texts):
        if any("BOOM" in t for t in texts):
            raise ValueError("cannot count\nBOOM")
        return [len(t.encode()) for t in texts]


def test_a_text_the_tokenizer_refuses_costs_only_its_line(folder, monkeypatch):
    monkeypatch.setattr(ingest_chunk, "get_tokenizer", lambda spec: FlakyTokenizer())
    lines = "\n".join([sft(answer="One."), sft(answer="BOOM"), sft(question="Longer question?", answer="Three.")])
    result = process_chunk(make_task(folder, lines.encode()))
    assert rejects_of(folder, result) == [(2, "internal_error", "ValueError while counting tokens: cannot count BOOM"
                                           + TAIL)]
    # per record after the failed batch: 5 + 4 and 16 + 6
    assert [(r["line_number"], r["text_tokens"]) for r in rows_of(folder, result)] == [(1, 9), (3, 22)]
    assert (result.rows_read, result.rows_written, result.rows_rejected) == (3, 2, 1)


def test_batch_token_counts_go_to_their_own_records(folder, monkeypatch):
    monkeypatch.setattr(ingest_chunk, "get_tokenizer", lambda spec: FlakyTokenizer())
    lines = "\n".join([sft(answer="A"), sft(question="Qq", answer="Bbbbbbbb"), sft(question="Qqqqqqq", answer="C")])
    result = process_chunk(make_task(folder, lines.encode()))
    assert [r["text_tokens"] for r in rows_of(folder, result)] == [5 + 1, 2 + 8, 7 + 1]


def test_a_row_arrow_refuses_costs_only_its_line(folder, monkeypatch):
    real = ingest_chunk.ChunkProcessor.finish

    def finish(self, items):
        rows = real(self, items)
        for row in rows:
            if row["line_number"] == 2:
                row["num_tokens"] = "not a number"
        return rows

    monkeypatch.setattr(ingest_chunk.ChunkProcessor, "finish", finish)
    result = process_chunk(make_task(folder, "\n".join(sft(answer=f"Answer {i}.") for i in range(3)).encode()))
    [(line, reason, detail)] = rejects_of(folder, result)
    assert (line, reason) == (2, "internal_error") and " while converting the row to Arrow: " in detail
    assert not detail.startswith("NoneType")                     # the exception Arrow raised is named
    assert [r["line_number"] for r in rows_of(folder, result)] == [1, 3]
    assert (result.rows_written, result.samples_written, result.rows_rejected, result.images) == (2, 2, 1, 2)
    assert result.text_tokens == 2 * (5 + 9)


def test_an_unexpected_error_while_building_a_row(folder, monkeypatch):
    def boom(*args):
        raise KeyError("x")

    monkeypatch.setattr(ingest_chunk, "packed_length", boom)
    result = process_chunk(make_task(folder, sft().encode()))
    assert rejects_of(folder, result) == [(1, "internal_error", "KeyError while building the row: 'x'" + TAIL)]
    assert result.shard_file is None


def _nifti(path: Path, slices: int) -> None:
    data = np.arange(16 * 16 * slices, dtype=np.float32).reshape(16, 16, slices)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_expanded_slices_are_rows_of_one_line(folder):
    _nifti(folder / "data" / "v.nii", 3)
    _nifti(folder / "data" / "w.nii", 2)
    two = json.dumps({"input_img": [{"path": "v.nii"}, {"path": "w.nii"}],
                      "message": [{"from": "human", "value": "<image><image>\nCompare."}, {"from": "gpt", "value": "Same."}]})
    lines = "\n".join([sft("v.nii"), two, sft()])
    result = process_chunk(make_task(folder, lines.encode(), extra_options={"slices": "all"}))
    rows = rows_of(folder, result)
    assert [r["sample_id"] for r in rows] == ["d:1:s0", "d:1:s1", "d:1:s2", "d:3"]
    assert (result.rows_read, result.rows_written, result.samples_written, result.rows_rejected) == (3, 2, 4, 1)
    assert result.images == 4 and result.text_tokens == 3 * 9 + 9   # each slice row counts its texts
    assert rejects_of(folder, result) == [(2, "frames_ambiguous", "more than one image of this record expands "
                                                                  "into frames; expand at most one image per record")]


def test_internal_error_text_is_one_line_of_at_most_300_characters():
    err = internal(ValueError("first\nsecond" + "x" * 400), "doing it")
    assert err.reason == "internal_error"
    assert err.detail == "ValueError while doing it: first second" + "x" * 288 + TAIL


def test_write_rejects_sorts_by_line(tmp_path):
    rows = [{"line_number": n, "reason": "json_invalid", "detail": "d", "raw": "r"} for n in (3, 1, 2)]
    write_rejects(tmp_path / "r.parquet", rows)
    assert pq.read_table(tmp_path / "r.parquet").column("line_number").to_pylist() == [1, 2, 3]


def test_a_failed_chunk_rejects_every_line_of_its_range(folder):
    staging = folder / "staging"
    (staging / "chunk-00007.parquet").write_bytes(b"half")            # what the dead worker left
    (staging / "chunk-00008.parquet").write_bytes(b"another chunk")
    lines = b"first\n\nsecond\nthird\n"
    result = failed_chunk(make_task(folder, lines, first_line=10), "MemoryError")
    detail = ("the worker processing lines 10-13 (chunk 7) failed twice (MemoryError); this line was not processed: "
              "run the ingest again, or split the file to find the line that kills the worker")
    assert (result.rows_read, result.rows_rejected, result.rows_written, result.blank_lines) == (3, 3, 0, 1)
    assert result.reasons == {"worker_failed": 3} and result.examples == {"worker_failed": [10, detail]}
    assert result.rejects_file == "_rejects-00007.parquet"
    assert sorted(p.name for p in staging.iterdir()) == ["_rejects-00007.parquet", "chunk-00008.parquet"]
    table = pq.read_table(staging / "_rejects-00007.parquet").to_pylist()
    assert [(r["line_number"], r["reason"], r["detail"], r["raw"]) for r in table] == [
        (10, "worker_failed", detail, "first"), (12, "worker_failed", detail, "second"),
        (13, "worker_failed", detail, "third")]


def test_a_failed_chunk_of_blank_lines_writes_nothing(folder):
    result = failed_chunk(make_task(folder, b"\n  \n"), "x")
    assert (result.rows_read, result.blank_lines, result.rejects_file, result.reasons) == (0, 2, None, {})
    assert list((folder / "staging").iterdir()) == []


def test_a_failed_chunk_names_itself_and_keeps_undecodable_bytes(folder):
    result = failed_chunk(make_task(folder, b"caf\xe9\n", chunk_index=3), "killed")
    assert (result.dataset, result.chunk_index, result.rows_rejected) == ("d", 3, 1)
    [row] = pq.read_table(folder / "staging" / "_rejects-00003.parquet").to_pylist()
    assert row["raw"] == "caf\ufffd" and row["detail"].startswith("the worker processing lines 1-1 (chunk 3)")
    assert result.examples == {"worker_failed": [1, row["detail"]]}


def test_stored_pixels_and_a_body_that_does_not_decode(folder):
    body = bytearray(png(16, 16))
    at = body.index(b"IDAT") + 6                      # after the chunk type and the 2-byte zlib header
    body[at:at + 8] = b"\xff" * 8                     # header and length intact, compressed pixels garbled
    (folder / "data" / "cut.png").write_bytes(bytes(body))
    result = process_chunk(make_task(folder, (sft() + "\n" + sft("cut.png")).encode(), store_pixels=True))
    struct = rows_of(folder, result)[0]["input_images"][0]
    # a one-colour image stays that colour at any size: 512 x 512 and 378 x 378 RGB pixels of (120, 30, 200)
    assert struct["vae_pixels"] == bytes([120, 30, 200]) * (512 * 512)
    assert struct["vit_pixels"] == bytes([120, 30, 200]) * (378 * 378)
    [(line, reason, detail)] = rejects_of(folder, result)
    assert (line, reason) == (2, "image_corrupt")
    assert detail.startswith("'cut.png': the header is valid but the image does not decode (")
    assert detail.endswith("); re-export the file")


def test_a_failed_chunk_rejects_only_its_byte_range(folder):
    result = failed_chunk(make_task(folder, b"a\nb\nc\n", length=4), "x")      # "a\nb\n" of the file
    assert result.rows_rejected == 2
    assert pq.read_table(folder / "staging" / "_rejects-00007.parquet").column("raw").to_pylist() == ["a", "b"]


def test_a_chunk_whose_only_row_arrow_refuses_writes_no_shard(folder, monkeypatch):
    real = ingest_chunk.ChunkProcessor.finish

    def finish(self, items):
        rows = real(self, items)
        for row in rows:
            row["num_tokens"] = "not a number"
        return rows

    monkeypatch.setattr(ingest_chunk.ChunkProcessor, "finish", finish)
    result = process_chunk(make_task(folder, sft().encode()))
    assert (result.shard_file, result.rows_written, result.rows_rejected) == (None, 0, 1)
    assert not (folder / "staging" / "chunk-00007.parquet").exists()


def test_get_tokenizer_loads_each_spec_once(monkeypatch, tmp_path):
    monkeypatch.setattr(ingest_chunk, "_TOKENIZERS", {})
    tok = ingest_chunk.get_tokenizer(None)
    assert tok.encode("ab") == [tok.encode("a")[0], tok.encode("b")[0]]   # the builtin tokenizer: a token a byte
    assert ingest_chunk.get_tokenizer(None) is tok and ingest_chunk._TOKENIZERS == {None: tok}
    with pytest.raises(FileNotFoundError):                                # a directory spec is loaded, not ignored
        ingest_chunk.get_tokenizer(str(tmp_path / "no-tokenizer-here"))


def test_vae_uses_one_image_budget_and_vit_the_image_count(folder):
    # VAE max_pixels 300,000: 512 x 512 = 262,144 fits the budget of one image (the VAE transform always gets
    # img_num 1). vlm_sft shares the ViT budget between a record's images (docs/upstream-compat.md#resize-rule):
    # max_pixels 200,000 / 2 images = 100,000 < 378 x 378 = 142,884, so s = 100,000 / 142,884; 378 s = 264.55
    # -> 265 -> 265 / 14 = 18.9 -> 19 x 14 = 266; 19 x 19 = 361 patches
    two = json.dumps({"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "No."}]})
    result = process_chunk(make_task(folder, two.encode(), task="vlm_sft",
                                     image_transform_args={**VAE, "max_pixels": 300_000},
                                     vit_image_transform_args={**VIT, "max_pixels": 200_000}))
    [row] = rows_of(folder, result)
    assert [(i["vae_width"], i["vae_height"], i["vae_tokens"], i["vit_width"], i["vit_height"], i["vit_tokens"])
            for i in row["input_images"]] == [(512, 512, 1024, 266, 266, 361)] * 2


def _nifti_patterns(path: Path) -> None:
    """16x16x3: slice 0 left half 1, slice 1 top half 1, slice 2 one corner quarter 1 (the rest 0)."""
    data = np.zeros((16, 16, 3), dtype=np.float32)
    data[:8, :, 0] = 1
    data[:, :8, 1] = 1
    data[:8, :8, 2] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_medical_meta_is_sorted_json_and_stored_pixels_follow_the_slice(folder):
    _nifti_patterns(folder / "data" / "v.nii")
    lines = "\n".join([sft("v.nii"), sft()])
    result = process_chunk(make_task(folder, lines.encode(), store_pixels=True, extra_options={"slices": "all"}))
    rows = rows_of(folder, result)
    assert [r["sample_id"] for r in rows] == ["d:1:s0", "d:1:s1", "d:1:s2", "d:2"]
    images = [r["input_images"][0] for r in rows]
    assert images[3]["meta"] is None                                   # a PNG has no medical metadata
    metas = [json.loads(i["meta"]) for i in images[:3]]
    assert [m["slice"] for m in metas] == [0, 1, 2]
    for image, meta in zip(images[:3], metas):                         # keys sorted, at every level
        assert image["meta"] == json.dumps(meta, sort_keys=True)
    # each slice row stores its own slice's pixels (the decoder is told the slice by the meta): three patterns
    assert len({i["vae_pixels"] for i in images[:3]}) == 3
    assert len({i["vit_pixels"] for i in images[:3]}) == 3


class CountingTokenizer(FlakyTokenizer):
    """FlakyTokenizer that records every call's texts."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def count_tokens(self, texts):
        self.calls.append(list(texts))
        return super().count_tokens(texts)


def test_one_batch_call_counts_every_record(folder, monkeypatch):
    tok = CountingTokenizer()
    monkeypatch.setattr(ingest_chunk, "get_tokenizer", lambda spec: tok)
    lines = "\n".join([sft(question="Q1", answer="A"), sft(question="Q22", answer="Bb")])
    result = process_chunk(make_task(folder, lines.encode()))
    assert tok.calls == [["Q1", "A", "Q22", "Bb"]]           # one call for the group, texts in record order
    assert [r["text_tokens"] for r in rows_of(folder, result)] == [2 + 1, 3 + 2]


def test_an_image_struct_is_built_once_per_file_and_setting(folder, monkeypatch):
    built = []
    real = ingest_chunk.ChunkProcessor._image_struct

    def spy(self, ref, rel, probe, vit_num):
        built.append(rel)
        return real(self, ref, rel, probe, vit_num)

    monkeypatch.setattr(ingest_chunk.ChunkProcessor, "_image_struct", spy)
    lines = "\n".join([sft(), sft(answer="Again."), sft("b.png"), sft()])
    result = process_chunk(make_task(folder, lines.encode()))
    assert result.rows_written == 4 and built == ["a.png", "b.png"]          # a.png's struct is reused
    process_chunk(make_task(folder, sft().encode()))                        # the next chunk of this process too
    assert built == ["a.png", "b.png"]


def test_the_tasks_tokenizer_spec_and_row_identity(folder, monkeypatch):
    specs = []
    monkeypatch.setattr(ingest_chunk, "get_tokenizer", lambda spec: specs.append(spec) or FlakyTokenizer())
    result = process_chunk(make_task(folder, sft().encode(), tokenizer="some/tokenizer/dir"))
    assert specs == ["some/tokenizer/dir"]
    [row] = rows_of(folder, result)
    assert (row["sample_id"], row["dataset"], row["task"], row["line_number"]) == ("d:1", "d", "sft", 1)


def test_a_record_mapping_reads_openai_style_records(folder):
    # columns/tags of the catalog entry: messages under "msgs", images under "pics", role "role" / text "content"
    mapping = {"messages": "msgs", "images": "pics", "role_tag": "role", "content_tag": "content",
               "user_tag": "user", "assistant_tag": "assistant"}
    line = json.dumps({"pics": ["a.png"], "msgs": [{"role": "user", "content": "<image>\nWhat?"},
                                                  {"role": "assistant", "content": "Yes."}]})
    result = process_chunk(make_task(folder, line.encode(), task="vlm_sft", extra_options={"record_mapping": mapping}))
    [row] = rows_of(folder, result)
    assert row["messages"] == [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Yes."}]
    assert [i["path"] for i in row["input_images"]] == ["a.png"] and row["text_tokens"] == 5 + 4


def test_image_byte_cap_and_verify_reach_the_probe(folder):
    # a.png is a 16x16 PNG of more than 50 bytes: a 50-byte cap rejects it before it is opened
    result = process_chunk(make_task(folder, sft().encode(), max_image_bytes=50))
    assert result.reasons == {"image_too_big": 1}
    body = bytearray(png(16, 16))
    at = body.index(b"IDAT") + 6
    body[at:at + 8] = b"\xff" * 8                     # the header is valid, the compressed pixels are not
    (folder / "data" / "cut.png").write_bytes(bytes(body))
    assert process_chunk(make_task(folder, sft("cut.png").encode())).rows_written == 1       # header-only probe
    image_cache.PROBES.clear()
    image_cache.STRUCTS.clear()
    assert process_chunk(make_task(folder, sft("cut.png").encode(), verify_images=True)).reasons == {"image_corrupt": 1}


def test_a_file_is_probed_once_per_process(folder, monkeypatch):
    probed = []
    real = ingest_chunk.probe_image

    def spy(*args, **kwargs):
        probed.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_chunk, "probe_image", spy)
    process_chunk(make_task(folder, "\n".join([sft(), sft(answer="Again."), sft("b.png")]).encode()))
    process_chunk(make_task(folder, sft().encode()))
    assert len(probed) == 2                                               # a.png and b.png, once each


def test_images_after_the_expanded_one_stay_in_every_slice_row(folder):
    _nifti(folder / "data" / "v.nii", 2)
    line = json.dumps({"input_img": [{"path": "a.png"}, {"path": "v.nii"}, {"path": "b.png"}],
                       "message": [{"from": "human", "value": "<image><image><image>\nCompare."},
                                   {"from": "gpt", "value": "Same."}]})
    result = process_chunk(make_task(folder, line.encode(), extra_options={"slices": "all"}))
    rows = rows_of(folder, result)
    assert [r["sample_id"] for r in rows] == ["d:1:s0", "d:1:s1"]
    assert [[i["path"] for i in r["input_images"]] for r in rows] == [["a.png", "v.nii", "b.png"]] * 2


def test_cached_structs_follow_the_extra_options(folder):
    _nifti_patterns(folder / "data" / "v.nii")
    sources = []
    for window in ("minmax", "lung", "minmax"):
        result = process_chunk(make_task(folder, sft("v.nii").encode(), extra_options={"window": window}))
        sources.append(json.loads(rows_of(folder, result)[0]["input_images"][0]["meta"])["window"]["source"])
    assert sources == ["minmax", "lung", "minmax"]



def test_an_unexpected_error_while_probing_costs_only_its_line(folder, monkeypatch):
    real = ingest_chunk.ChunkProcessor.probe_record

    def probe_record(self, line_number, raw, *args, **kwargs):
        if line_number == 3:
            raise RuntimeError("boom")
        return real(self, line_number, raw, *args, **kwargs)

    monkeypatch.setattr(ingest_chunk.ChunkProcessor, "probe_record", probe_record)
    lines = "\n".join([sft(), "", sft(answer="Two."), "", sft(answer="Three.")])    # lines 1, 3, 5; 2 blanks
    result = process_chunk(make_task(folder, lines.encode()))
    assert rejects_of(folder, result) == [(3, "internal_error", "RuntimeError while validating the record and "
                                                                "probing its images: boom" + TAIL)]
    [reject] = pq.read_table(folder / "staging" / result.rejects_file).to_pylist()
    assert reject["raw"] == sft(answer="Two.")
    assert [r["line_number"] for r in rows_of(folder, result)] == [1, 5]
    assert (result.blank_lines, result.rows_rejected, result.rows_written) == (2, 1, 2)
    assert 0 <= result.seconds < 600


@pytest.mark.parametrize("rows, nbytes, logical, groups", [
    # the same image s bytes in every row: counted once per group for the distinct bytes, once per row for the
    # logical (in-memory) bytes
    (256, None, "2s", [2, 2, 2, 1]),      # logical s, 2s >= 2s: close every 2 rows
    (256, None, "2s+1", [3, 3, 1]),       # s, 2s, 3s >= 2s + 1: every 3 rows; the count restarts at 0
    (2, "s+1", None, [2, 2, 2, 1]),       # distinct bytes s < s + 1 never close; each new group restarts at 0
])
def test_row_groups_close_by_logical_bytes_and_restart_their_counts(folder, monkeypatch, rows, nbytes, logical,
                                                                     groups):
    s = len(png(16, 16))
    limits = {None: None, "s+1": s + 1, "2s": 2 * s, "2s+1": 2 * s + 1}
    if logical:
        monkeypatch.setattr(ingest_chunk, "ROW_GROUP_LOGICAL_BYTES", limits[logical])
    lines = "\n".join(sft(answer=f"Answer {i}.") for i in range(7))
    kw = {"row_group_bytes": limits[nbytes]} if nbytes else {}
    result = process_chunk(make_task(folder, lines.encode(), row_group_rows=rows, **kw))
    meta = pq.ParquetFile(folder / "staging" / result.shard_file).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups


def test_a_slice_row_that_fails_rejects_its_whole_line_once(folder, monkeypatch):
    _nifti(folder / "data" / "v.nii", 3)
    real = ingest_chunk.packed_length
    calls = []

    def first_fails(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("x")
        return real(*args)

    monkeypatch.setattr(ingest_chunk, "packed_length", first_fails)
    lines = "\n".join([sft("v.nii"), sft()])
    result = process_chunk(make_task(folder, lines.encode(), extra_options={"slices": "all"}))
    assert rejects_of(folder, result) == [(1, "internal_error", "KeyError while building the row: 'x'" + TAIL)]
    assert [r["sample_id"] for r in rows_of(folder, result)] == ["d:2"]     # slices 1 and 2 of line 1 dropped too
    assert len(calls) == 2                                                  # line 1's other slices not built


def test_a_text_only_record_keeps_its_line_and_raw_bytes(folder, monkeypatch):
    monkeypatch.setattr(ingest_chunk, "get_tokenizer", lambda spec: FlakyTokenizer())
    text = json.dumps({"message": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]})
    boom = json.dumps({"message": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "BOOM"}]})
    result = process_chunk(make_task(folder, "\n".join(["", text, boom]).encode(), task="text_only", data_dir=None))
    [row] = rows_of(folder, result)
    assert (row["sample_id"], row["line_number"], row["input_images"], row["text_tokens"]) == ("d:2", 2, [], 3 + 6)
    [reject] = pq.read_table(folder / "staging" / result.rejects_file).to_pylist()
    assert (reject["line_number"], reject["reason"], reject["raw"]) == (3, "internal_error", boom)


def test_stored_pixels_of_a_medical_image_follow_the_catalog_window(folder):
    # values 0 and 1 through the lung window (centre -600, width 1500) are both light grey, near 230; through
    # min-max they are black and white: the stored pixels must differ
    _nifti_patterns(folder / "data" / "v.nii")
    stored = {}
    for window in ("minmax", "lung"):
        result = process_chunk(make_task(folder, sft("v.nii").encode(), store_pixels=True,
                                         extra_options={"window": window}))
        stored[window] = rows_of(folder, result)[0]["input_images"][0]["vae_pixels"]
    assert set(stored["minmax"]) >= {0, 255}
    assert min(stored["lung"]) > 200 and stored["lung"] != stored["minmax"]
