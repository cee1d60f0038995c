"""Batch evaluation over JSONL files in the catalog's UniMedVL record format (input_img / output_img /
message, docs/upstream-compat.md#sequence-plans): one output record per input line, written atomically, with progress.

Image paths resolve as upstream: the leading path separator is stripped, then the path is joined to data_dir.
A bad record (invalid JSON, missing or unreadable image, prompt too long) is reported in its output record
under "error" and counted; the batch goes on.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from datasets_catalog.plan import IMAGE_TAG, Message
from datasets_catalog.records import RecordError, parse_images, parse_messages, decode_line

from .loading import InferenceError


@dataclass
class BatchRecord:
    line: int
    obj: dict[str, Any]
    messages: list[Message]
    input_images: list[Path]


@dataclass
class BatchSummary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)   # "line N: message", first few

    def line(self, what: str) -> str:
        rate = f", {self.seconds / self.total:.2f} s/record" if self.total else ""
        return f"{what}: {self.ok}/{self.total} records done, {self.failed} failed in {self.seconds:.1f} s{rate}"


def resolve_image(data_dir: Path, path: str) -> Path:
    """Upstream rule: strip the leading separator, join to data_dir."""
    return data_dir / path.lstrip("/\\")


def read_records(path: Path, data_dir: Path) -> Iterator[tuple[int, BatchRecord | None, str | None]]:
    """(line number, record or None, error or None) for every non-blank line."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InferenceError(f"--input {path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = decode_line(raw.rstrip(b"\r\n"))
                extra: dict = {}
                images = parse_images(obj, "input_img", "input", extra)
                messages = parse_messages(obj, "message", extra)
            except RecordError as exc:
                yield n, None, exc.detail
                continue
            yield n, BatchRecord(n, obj, messages, [resolve_image(data_dir, i.path) for i in images]), None


def last_human(messages: list[Message]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "human":
            return i
    return None


def instruction_of(messages: list[Message], keep_tags: bool = False) -> str | None:
    """The last human turn without its `<image>` tags (what UniMedVL's editing script passes as instruction),
    or, with keep_tags, stripped but verbatim (the human text of edit training records, docs/upstream-compat.md#sequence-plans)."""
    i = last_human(messages)
    if i is None:
        return None
    value = messages[i].value
    return value.strip() if keep_tags else value.replace(IMAGE_TAG, "").strip()


def _atomic_jsonl(path: Path) -> tuple[TextIO, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def run_batch(input_path: Path, output_path: Path, data_dir: Path,
              handle: Callable[[BatchRecord], dict[str, Any]], what: str,
              progress: TextIO | None = sys.stderr) -> BatchSummary:
    """Apply `handle` to every record; write {**record, **result} (or {**record, "error": ...}) per line."""
    summary = BatchSummary()
    start = time.perf_counter()
    records = list(read_records(input_path, data_dir))
    out, tmp = _atomic_jsonl(output_path)
    try:
        with out:
            for n, rec, err in records:
                summary.total += 1
                if rec is not None:
                    try:
                        result = {**rec.obj, **handle(rec)}
                        summary.ok += 1
                    except InferenceError as exc:
                        err = str(exc)
                if err is not None:
                    summary.failed += 1
                    if len(summary.errors) < 10:
                        summary.errors.append(f"line {n}: {err}")
                    result = {**(rec.obj if rec else {}), "line": n, "error": err}
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                out.flush()
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    print(f"[{what}] {summary.total}/{len(records)} records, {summary.failed} failed, "
                          f"{elapsed:.1f} s", file=progress, flush=True)
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary.seconds = time.perf_counter() - start
    return summary


def vqa_handler(inferencer, **options) -> Callable[[BatchRecord], dict[str, Any]]:
    """Answer the last human turn (earlier turns are context); the reference answer is kept."""

    def handle(rec: BatchRecord) -> dict[str, Any]:
        i = last_human(rec.messages)
        if i is None:
            raise InferenceError("the record has no human message to answer")
        answer = inferencer.chat(rec.input_images, rec.messages[: i + 1], **options)
        reference = next((m.value for m in rec.messages[i + 1:] if m.role == "gpt"), None)
        message = [{"from": m.role, "value": m.value} for m in rec.messages[: i + 1]]
        return {"message": message + [{"from": "gpt", "value": answer}], "reference": reference}

    return handle


def generate_handler(generator, image_dir: Path, keep_tags: bool = False, **options,
                     ) -> Callable[[BatchRecord], dict[str, Any]]:
    """Generate from input_img[0] (if any) and the last human turn; the image goes to image_dir/NNNNNN.png
    and `output_img` points at it (relative to image_dir: use image_dir as data_dir); the record's own
    output_img is kept as `reference_output_img`."""
    from .jobs_io import save_png

    def handle(rec: BatchRecord) -> dict[str, Any]:
        instruction = instruction_of(rec.messages, keep_tags)
        if not instruction:
            raise InferenceError("the record has no human message to use as the instruction")
        image = rec.input_images[0] if rec.input_images else None
        result = generator.infer_single(image, instruction, **options)
        name = f"{rec.line:06d}.png"
        save_png(result.image, image_dir / name)
        message = [{"from": "human", "value": rec.messages[last_human(rec.messages)].value}]
        text = result.thought or result.understanding
        if text:
            message.append({"from": "gpt", "value": text})
        out = {"output_img": [{"path": name, "height": result.height, "width": result.width}], "message": message}
        if "output_img" in rec.obj:
            out["reference_output_img"] = rec.obj["output_img"]
        return out

    return handle
