"""One unit of ingest work: a byte range of one JSONL file -> one Parquet shard + its rejects.

Pure Python + pyarrow, no Ray: the ingest (`pipelines.ingest.execute`) maps this over chunks in parallel with
Ray Data, and tests call it directly. A chunk streams its lines (bounded memory: one row group of image bytes at a
time), validates each record (`datasets_catalog.records`), probes its images (`pipelines.imaging.probe`),
computes the resize targets and token counts with the shared rules, and writes the shard itself, so image
bytes never travel through Ray's object store.

Every exception raised while handling one line becomes a reject of that line (`internal_error` for the
unexpected ones, with the exception in `detail`), so no record can abort the chunk. Each distinct image is
probed and turned into its shard struct once per worker process (`pipelines.ingest.image_cache`), and the
image columns are dictionary-encoded, so an image that several rows of a row group share is stored once.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datasets_catalog.columns import RecordMapping
from datasets_catalog.plan import ImageSlot, ImageTokens, packed_length
from datasets_catalog.records import ImageRef, ParsedRecord, RecordError, check_length, decode_line, \
    parse_record, vit_img_num
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs, resize_target, vae_tokens, vit_tokens

from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.imaging.probe import (
    ImageError, ImageProbe, check_file, clear_path_cache, probe_image, resolve_image_path,
)
from pipelines.ingest import image_cache
from pipelines.storage import uris as storage
from pipelines.storage.shard_schema import PIXEL_FIELDS, REJECTS_SCHEMA, SHARD_SCHEMA, leaf_paths

ROW_GROUP_ROWS = 256
ROW_GROUP_BYTES = 64 * 1024 * 1024          # distinct image bytes per row group (what lands on disk)
ROW_GROUP_LOGICAL_BYTES = 256 * 1024 * 1024  # image bytes counted once per row: bounds the Arrow table in memory
BOM = b"\xef\xbb\xbf"
PIXEL_ROW_GROUP_BYTES = 32 * 1024 * 1024   # store_pixels rows hold MBs: smaller groups keep loader caches small


# Image bytes are already compressed (PNG/JPEG), and stored pixels are read on every training step (a raw
# copy beats any decompression there): store both as they are; compress everything else.
_RAW_COLUMNS = (".bytes", *(f".{name}" for name in PIXEL_FIELDS))
_COMPRESSION = {path: "NONE" if path.endswith(_RAW_COLUMNS) else "ZSTD" for path in leaf_paths(SHARD_SCHEMA)}
# Dictionary encoding stores each distinct value of a column chunk once: the image of ten questions is one
# dictionary entry plus ten small indexes (docs/ingest.md#storage-layout). Readers see plain values.
_DICTIONARY_COLUMNS = ["dataset", "task", *(p for p in leaf_paths(SHARD_SCHEMA) if "_images.list.element." in p)]


@dataclass(frozen=True)
class ChunkTask:
    """Everything a worker needs for one chunk (plain data: it is shipped to Ray workers as a dict)."""

    dataset: str
    task: str
    jsonl_path: str
    data_dir: str | None
    offset: int
    length: int
    first_line: int                  # 1-based line number of the first line in the range
    chunk_index: int
    staging_dir: str
    image_transform_args: dict[str, int]
    vit_image_transform_args: dict[str, int]
    max_image_pixels: int
    max_image_bytes: int = 512 * 1024 * 1024
    tokenizer: str | None = None
    reference_images: bool = False
    verify_images: bool = False
    store_pixels: bool = False       # also store the decoded, resized VAE/ViT pixels (pipelines.imaging.pixels)
    extra_options: dict[str, Any] = field(default_factory=dict)
    row_group_rows: int = ROW_GROUP_ROWS
    row_group_bytes: int = ROW_GROUP_BYTES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChunkResult:
    dataset: str
    chunk_index: int
    rows_read: int = 0
    rows_written: int = 0
    samples_written: int = 0
    rows_rejected: int = 0
    blank_lines: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list] = field(default_factory=dict)   # reason -> [line_number, detail] of its first reject
    images: int = 0
    image_bytes: int = 0
    text_tokens: int = 0
    num_tokens: int = 0
    shard_file: str | None = None
    shard_bytes: int = 0
    rejects_file: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TOKENIZERS: dict[str | None, TextTokenizer] = {}


def get_tokenizer(spec: str | None) -> TextTokenizer:
    """One tokenizer per worker process (loading a Qwen2 tokenizer costs ~0.5 s)."""
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = TextTokenizer.load(spec)
    return _TOKENIZERS[spec]


def iter_lines(path: str, offset: int, length: int):
    """Yield the raw lines (without the newline) of `length` bytes starting at `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if offset == 0 and data.startswith(BOM):   # a UTF-8 byte-order mark is not part of the first record
        data = data[len(BOM):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        yield line[:-1] if line.endswith(b"\r") else line


class _Probed:
    """A validated record with its probed images, waiting for its token counts."""

    __slots__ = ("line_number", "raw", "record", "inputs", "outputs", "frame")

    def __init__(self, line_number: int, raw: bytes, record: ParsedRecord, inputs: list[dict],
                 outputs: list[dict], frame: int | str | None) -> None:
        self.line_number, self.raw, self.record, self.inputs, self.outputs, self.frame = \
            line_number, raw, record, inputs, outputs, frame


class ChunkProcessor:
    """Turns lines into shard rows; stateless across chunks apart from the cached tokenizer."""

    def __init__(self, task: ChunkTask) -> None:
        self.task = task
        self.kind = resolve_task_kind(task.task)
        self.vae_args = ImageTransformArgs(**task.image_transform_args)
        self.vit_args = ImageTransformArgs(**task.vit_image_transform_args)
        self.data_dir = Path(task.data_dir) if task.data_dir else None
        self.tokenizer = get_tokenizer(task.tokenizer)
        clear_path_cache()
        # what an image struct depends on besides the file: part of every cache key
        self.settings = (task.task, tuple(sorted(task.image_transform_args.items())),
                         tuple(sorted(task.vit_image_transform_args.items())), task.max_image_pixels,
                         task.max_image_bytes, task.reference_images, task.verify_images, task.store_pixels,
                         json.dumps(task.extra_options, sort_keys=True, default=str))
        mapping = task.extra_options.get("record_mapping")   # catalog columns:/tags: (datasets_catalog.columns)
        self.mapping = RecordMapping.from_dict(mapping) if mapping else None
        self.result = ChunkResult(task.dataset, task.chunk_index)
        self.rejects: list[dict[str, Any]] = []

    def reject(self, line_number: int, exc: RecordError, raw: bytes) -> None:
        """Record one rejected line (its reason counted, the first detail per reason kept as an example)."""
        self.rejects.append({"line_number": line_number, "reason": exc.reason, "detail": exc.detail,
                             "raw": raw.decode("utf-8", errors="replace")})
        result = self.result
        result.rows_rejected += 1
        result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1
        result.examples.setdefault(exc.reason, [line_number, exc.detail])

    # -- one record ----------------------------------------------------------------------------
    def _image_struct(self, ref: ImageRef, rel: str, probe: ImageProbe, vit_num: int) -> dict[str, Any]:
        if ref.width is not None and ref.width != probe.width or ref.height is not None and ref.height != probe.height:
            raise ImageError("size_mismatch", f"{ref.role}_img[{ref.index}] {rel!r} declares "
                                              f"{ref.width}x{ref.height} but the file is "
                                              f"{probe.width}x{probe.height}; fix or drop width/height")
        vae_w, vae_h = resize_target(probe.width, probe.height, self.vae_args, 1)
        vit_w, vit_h = resize_target(probe.width, probe.height, self.vit_args, vit_num)
        meta = json.dumps(probe.meta, sort_keys=True, default=str) if probe.meta else None
        pixels = self._pixels(rel, probe, meta, {"vae": (vae_w, vae_h), "vit": (vit_w, vit_h)}) \
            if self.task.store_pixels else {}
        return {
            "path": rel, "width": probe.width, "height": probe.height, "format": probe.format,
            "vae_width": vae_w, "vae_height": vae_h, "vae_tokens": vae_tokens(vae_w, vae_h),
            "vit_width": vit_w, "vit_height": vit_h, "vit_tokens": vit_tokens(vit_w, vit_h),
            "sha256": probe.sha256,
            "bytes": None if self.task.reference_images else probe.data,
            "meta": meta,
            **pixels,
        }

    def _cached_struct(self, ref: ImageRef, rel: str, probe: ImageProbe, vit_num: int, key: tuple) -> dict[str, Any]:
        """`_image_struct` once per (file version, frame, path as written, vit_num) in this worker process."""
        skey = (key, rel, vit_num)
        struct = image_cache.STRUCTS.get(skey)
        if struct is None:
            struct = self._image_struct(ImageRef(ref.role, ref.index, ref.path), rel, probe, vit_num)
            image_cache.STRUCTS.put(skey, struct, image_cache.struct_size(struct))
        if ref.width is not None and ref.width != struct["width"] or \
                ref.height is not None and ref.height != struct["height"]:
            raise ImageError("size_mismatch", f"{ref.role}_img[{ref.index}] {rel!r} declares "
                                              f"{ref.width}x{ref.height} but the file is "
                                              f"{struct['width']}x{struct['height']}; fix or drop width/height")
        return struct

    def _pixels(self, rel: str, probe: ImageProbe, meta: str | None,
                sizes: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        """The decoded, resized pixels of a `store_pixels` dataset; a body that does not decode is a reject."""
        from pipelines.imaging.decode import ImageDecodeError   # torch: only workers of store_pixels datasets load it
        from pipelines.imaging.pixels import resized_pixels

        try:
            return resized_pixels(probe.data, None, meta, sizes)
        except ImageDecodeError as exc:
            raise ImageError("image_corrupt", f"{rel!r}: the header is valid but the image does not decode "
                                              f"({exc}); re-export the file") from None

    def probe_record(self, line_number: int, raw: bytes) -> list[_Probed]:
        """Validate and probe one line; one entry per output row (several when frames are expanded)."""
        record = parse_record(decode_line(raw), self.kind, self.mapping)
        refs = record.images
        if not refs:
            return [_Probed(line_number, raw, record, [], [], None)]
        if self.data_dir is None:
            raise RecordError("field_type", "this record names images but the dataset has no data_dir; add "
                                            "data_dir to the catalog entry")
        vit_num = vit_img_num(self.kind, len(record.input_images))
        probes: list[tuple[ImageRef, str, ImageProbe, tuple]] = []
        for ref in refs:
            real, rel = resolve_image_path(self.data_dir, ref.path)
            key = (image_cache.file_key(str(real), check_file(real, self.task.max_image_bytes)), self.settings)
            probe = image_cache.PROBES.get(key)
            if probe is None:
                try:
                    probe = probe_image(real, self.task.max_image_pixels, self.task.extra_options,
                                        verify=self.task.verify_images, max_bytes=self.task.max_image_bytes)
                except ImageError as exc:
                    probe = exc
                image_cache.PROBES.put(key, probe, 512 if isinstance(probe, ImageError) else
                                       len(probe.data) + sum(len(f.data) for f in probe.frames or ()))
            if isinstance(probe, ImageError):   # a fresh exception: re-raising one object grows its traceback
                raise ImageError(probe.reason, probe.detail)
            probes.append((ref, rel, probe, key))
        framed = [i for i, (_, _, p, _) in enumerate(probes) if p.frames]
        if len(framed) > 1:
            raise RecordError("frames_ambiguous", "more than one image of this record expands into frames; "
                                                  "expand at most one image per record")
        variants: list[tuple[int | str | None, list[tuple[ImageRef, str, ImageProbe, tuple]]]] = [(None, probes)]
        if framed:
            at = framed[0]
            # frame id: the probe's own ("f10" = DICOM frame 10, "s12" = NIfTI slice 12), else the position
            variants = [((frame.meta or {}).get("frame_id", f),
                         [*probes[:at], (probes[at][0], probes[at][1], frame, (*probes[at][3], f)),
                          *probes[at + 1:]])
                        for f, frame in enumerate(probes[at][2].frames or ())]
        out = []
        for frame, items in variants:
            structs = [(ref, self._cached_struct(ref, rel, probe, vit_num, key)) for ref, rel, probe, key in items]
            out.append(_Probed(line_number, raw, record,
                               [s for r, s in structs if r.role == "input"],
                               [s for r, s in structs if r.role == "output"], frame))
        return out

    def _count_tokens(self, items: list[_Probed]) -> dict[int, list[int]]:
        """Text token counts per record (by id), one batch call; per record when the batch fails, so one bad
        text costs only its own line."""
        records: dict[int, _Probed] = {}
        for item in items:
            records.setdefault(id(item.record), item)
        texts = [t for item in records.values() for t in item.record.plan_texts]
        try:
            counts = self.tokenizer.count_tokens(texts) if texts else []
        except Exception:  # noqa: BLE001 - find the record that fails below
            counts = None
        out: dict[int, list[int]] = {}
        at = 0
        for rid, item in records.items():
            own = item.record.plan_texts
            if counts is not None:
                out[rid] = counts[at:at + len(own)]
                at += len(own)
                continue
            try:
                out[rid] = self.tokenizer.count_tokens(own) if own else []
            except Exception as exc:  # noqa: BLE001 - one record's failure is its own reject
                self.reject(item.line_number, internal(exc, "counting tokens"), item.raw)
        return out

    def finish(self, items: list[_Probed]) -> list[dict[str, Any]]:
        """Count text tokens for a group of records in one batch call and build their shard rows.

        The frames of one expanded record share its texts: they are counted once per record."""
        counts = self._count_tokens(items)
        rows = []
        rejected_lines: set[int] = {item.line_number for item in items if id(item.record) not in counts}
        for item in items:
            if item.line_number in rejected_lines:
                continue
            text_counts = counts[id(item.record)]
            try:
                tokens = {}
                for i, struct in enumerate(item.inputs):
                    tokens[ImageSlot("input", i)] = ImageTokens(struct["vae_tokens"], struct["vit_tokens"])
                for i, struct in enumerate(item.outputs):
                    tokens[ImageSlot("output", i)] = ImageTokens(struct["vae_tokens"], struct["vit_tokens"])
                num = packed_length(item.record.plan, text_counts, tokens)
                check_length(self.kind, num, len(item.record.plan.items))
                suffix = "" if item.frame is None else f":{item.frame}"
                row = {
                    "sample_id": f"{self.task.dataset}:{item.line_number}{suffix}",
                    "dataset": self.task.dataset, "task": self.kind.name, "line_number": item.line_number,
                    "messages": [{"from": m.role, "value": m.value} for m in item.record.messages],
                    "input_images": item.inputs, "output_images": item.outputs,
                    "text_tokens": sum(text_counts), "num_tokens": num,
                    "extra": json.dumps(item.record.extra, ensure_ascii=False, sort_keys=True)
                    if item.record.extra else None,
                }
            except Exception as exc:  # noqa: BLE001 - RecordError (too_long) or unexpected: this line only
                rejected_lines.add(item.line_number)
                rows = [r for r in rows if r["line_number"] != item.line_number]
                self.reject(item.line_number, exc if isinstance(exc, RecordError) else internal(exc, "building "
                                                                                                    "the row"),
                            item.raw)
                continue
            rows.append(row)
        return rows

    def to_table(self, rows: list[dict[str, Any]], raws: dict[int, bytes]) -> pa.Table | None:
        """Rows -> one Arrow table; a row Arrow refuses rejects its own line (internal_error), not the group."""
        try:
            return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        except Exception:  # noqa: BLE001 - find the line(s) at fault below
            pass
        kept, by_line = [], {}
        for row in rows:
            by_line.setdefault(row["line_number"], []).append(row)
        for line_number, group in by_line.items():
            try:
                pa.Table.from_pylist(group, schema=SHARD_SCHEMA)
                kept.extend(group)
            except Exception as exc:  # noqa: BLE001 - this line only
                self.reject(line_number, internal(exc, "converting the row to Arrow"), raws[line_number])
        return pa.Table.from_pylist(kept, schema=SHARD_SCHEMA) if kept else None


def internal(exc: BaseException, doing: str) -> RecordError:
    """An unexpected exception as the reject of one line (`internal_error`): type and message kept."""
    message = str(exc).replace("\n", " ")[:300]
    return RecordError("internal_error", f"{type(exc).__name__} while {doing}: {message}; this line was "
                                         f"skipped, the rest of the run went on (report it with the line)")


class _ShardWriter:
    """A Parquet writer over an 8 MB-buffered file (few large writes), closing both."""

    def __init__(self, path: Path) -> None:
        self.sink = pa.output_stream(str(path), buffer_size=8 << 20)
        self.writer = pq.ParquetWriter(
            self.sink, SHARD_SCHEMA, compression=_COMPRESSION, use_dictionary=_DICTIONARY_COLUMNS,
            dictionary_pagesize_limit=ROW_GROUP_LOGICAL_BYTES,
            write_statistics=["sample_id", "line_number", "num_tokens", "text_tokens"],
        )

    def write_table(self, table: pa.Table, row_group_size: int) -> None:
        self.writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()


def process_chunk(task: ChunkTask) -> ChunkResult:
    """Process one chunk: write `staging/chunk-NNNNN.parquet` and `staging/_rejects-NNNNN.parquet` (a local
    folder; `pipelines.ingest.remote.process_chunk_remote` wraps this for object storage)."""
    register_medical_imaging()   # this may be a fresh Ray worker: DICOM / NIfTI handlers for probe_image
    started = time.perf_counter()
    processor = ChunkProcessor(task)
    staging = Path(task.staging_dir)
    result = processor.result
    shard_path = staging / f"chunk-{task.chunk_index:05d}.parquet"
    writer: _ShardWriter | None = None
    pending: list[_Probed] = []
    distinct: set[int] = set()     # ids of the image byte strings in `pending` (shared by rows of one image)
    pending_bytes = logical_bytes = 0

    def flush() -> None:
        nonlocal writer, pending, pending_bytes, logical_bytes
        if not pending:
            return
        raws = {p.line_number: p.raw for p in pending}
        rows = processor.finish(pending)
        table = processor.to_table(rows, raws) if rows else None
        if table is not None:
            if writer is None:
                writer = _ShardWriter(shard_path)
            writer.write_table(table, row_group_size=table.num_rows)
            result.samples_written += table.num_rows
            lines = set(table.column("line_number").to_pylist())
            result.rows_written += len(lines)
            for row in rows:
                if row["line_number"] not in lines:
                    continue
                result.text_tokens += row["text_tokens"]
                result.num_tokens += row["num_tokens"]
                for struct in (*row["input_images"], *row["output_images"]):
                    result.images += 1
                    result.image_bytes += len(struct["bytes"] or b"")
        pending, pending_bytes, logical_bytes = [], 0, 0
        distinct.clear()

    line_number = task.first_line - 1
    try:
        for raw in iter_lines(task.jsonl_path, task.offset, task.length):
            line_number += 1
            if not raw.strip():
                result.blank_lines += 1
                continue
            result.rows_read += 1
            try:
                probed = processor.probe_record(line_number, raw)
            except RecordError as exc:
                processor.reject(line_number, exc, raw)
                continue
            except Exception as exc:  # noqa: BLE001 - no record may abort the chunk: it becomes its own reject
                processor.reject(line_number, internal(exc, "validating the record and probing its images"), raw)
                continue
            pending.extend(probed)
            for p in probed:
                for s in (*p.inputs, *p.outputs):
                    for k in ("bytes", *PIXEL_FIELDS):
                        value = s.get(k)
                        if value:
                            logical_bytes += len(value)
                            if id(value) not in distinct:
                                distinct.add(id(value))
                                pending_bytes += len(value)
            if len(pending) >= task.row_group_rows or pending_bytes >= task.row_group_bytes \
                    or logical_bytes >= ROW_GROUP_LOGICAL_BYTES:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        result.shard_file = shard_path.name
        result.shard_bytes = shard_path.stat().st_size
    if processor.rejects:
        rejects_path = staging / f"_rejects-{task.chunk_index:05d}.parquet"
        write_rejects(rejects_path, processor.rejects)
        result.rejects_file = rejects_path.name
    result.seconds = time.perf_counter() - started
    return result


def write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    """The rejects of a chunk, sorted by line (a row-level fallback may add some out of order)."""
    rejects = sorted(rejects, key=lambda r: r["line_number"])
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), str(path))


def failed_chunk(task: ChunkTask, why: str) -> ChunkResult:
    """The result of a chunk whose worker failed twice: every line of its range rejected as `worker_failed`
    (the partial output of the dead worker is never used), so no line is silently lost."""
    result = ChunkResult(task.dataset, task.chunk_index)
    rejects = []
    first, line_number = task.first_line, task.first_line - 1
    for raw in iter_lines(task.jsonl_path, task.offset, task.length):
        line_number += 1
        if not raw.strip():
            result.blank_lines += 1
            continue
        rejects.append({"line_number": line_number, "reason": "worker_failed", "detail": "",
                        "raw": raw.decode("utf-8", errors="replace")})
    for reject in rejects:
        reject["detail"] = (f"the worker processing lines {first}-{line_number} (chunk {task.chunk_index}) failed "
                            f"twice ({why}); this line was not processed: run the ingest again, or split the file "
                            f"to find the line that kills the worker")
    result.rows_read = result.rows_rejected = len(rejects)
    staging = storage.as_path(task.staging_dir)
    if isinstance(staging, Path):   # what the dead worker wrote must not be published with the dataset
        (staging / f"chunk-{task.chunk_index:05d}.parquet").unlink(missing_ok=True)
    if rejects:
        result.reasons["worker_failed"] = len(rejects)
        result.examples["worker_failed"] = [rejects[0]["line_number"], rejects[0]["detail"]]
        name = f"_rejects-{task.chunk_index:05d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), sink)
        storage.write_bytes_atomic(staging / name, sink.getvalue().to_pybytes())
        result.rejects_file = name
    return result
