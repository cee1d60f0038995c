"""What makes ingest idempotent and atomic: input fingerprints, chunk planning and publishing a dataset.

A dataset folder is complete iff it holds `_manifest.json`. It is built in `DIR/.staging-<name>-<pid>/`,
the manifest is written last, and the folder is swapped into place with renames, so an interrupted run
never leaves a folder that looks complete. The manifest's `fingerprint` covers everything that changes the
output (JSONL bytes, the image folder listing, transforms, tokenizer, options, schema and ingest version);
an unchanged fingerprint means there is nothing to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datasets_catalog.catalog import DatasetSpec

from pipelines.storage import uris as storage
from pipelines.storage.shard_schema import REJECTS_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA

INGEST_VERSION = 2          # bump when ingest output changes for the same inputs (2: dictionary-encoded image columns)
MANIFEST = "_manifest.json"
REJECTS = "_rejects.parquet"
FAILED_DIR = "_failed"
STAGING_PREFIX = ".staging-"


@dataclass
class SourceScan:
    """One streaming pass over the JSONL: its hash and the byte ranges of the chunks."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    lines: int
    chunks: list[tuple[int, int, int]] = field(default_factory=list)   # (offset, length, first_line)


def scan_source(path: Path, rows_per_chunk: int) -> SourceScan:
    """Hash the JSONL and cut it into chunks of `rows_per_chunk` lines, reading it once, line by line."""
    stat = path.stat()
    digest = hashlib.sha256()
    chunks: list[tuple[int, int, int]] = []
    offset = start = 0
    lines = 0
    first_line = 1
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            digest.update(line)
            lines += 1
            offset += len(line)
            if lines % rows_per_chunk == 0:
                chunks.append((start, offset - start, first_line))
                start, first_line = offset, lines + 1
    if offset > start:
        chunks.append((start, offset - start, first_line))
    return SourceScan(str(path), stat.st_size, stat.st_mtime_ns, digest.hexdigest(), lines, chunks)


def folder_digest(root: Path | None, exclude: Path | None = None) -> str | None:
    """sha256 over (relative path, size, mtime) of every file under `root`: detects added, removed,
    replaced or touched images without reading them. `exclude` (the output folder) is skipped."""
    if root is None:
        return None
    digest = hashlib.sha256()
    excluded = os.path.realpath(exclude) if exclude is not None else None
    entries: list[tuple[str, int, int]] = []
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        if excluded is not None and os.path.realpath(folder) == excluded:
            continue
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        try:
                            st = entry.stat()   # follows symlinks: a re-pointed link changes the digest
                        except OSError:
                            st = entry.stat(follow_symlinks=False)
                        entries.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    for rel, size, mtime in sorted(entries):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def settings_of(spec: DatasetSpec, tokenizer_name: str, reference_images: bool, verify_images: bool) -> dict:
    """Everything besides the input files that changes a dataset's output."""
    return {
        "task": spec.task.name,
        "transforms": {"image_transform_args": spec.image_transform_args.to_dict(),
                       "vit_image_transform_args": spec.vit_image_transform_args.to_dict()},
        "tokenizer": tokenizer_name,
        "reference_images": reference_images,
        "verify_images": verify_images,
        "max_image_pixels": spec.max_image_pixels,
        "max_image_bytes": spec.max_image_bytes,
        "rows_per_shard": spec.rows_per_shard,
        **({"store_pixels": True} if spec.store_pixels else {}),   # absent when off: old manifests still match
        "extra_options": spec.extra_options,
        "schema_version": SCHEMA_VERSION,
        "ingest_version": INGEST_VERSION,
    }


def fingerprint(source_sha256: str, data_dir_digest: str | None, settings: dict) -> str:
    blob = json.dumps({"source": source_sha256, "data_dir": data_dir_digest, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def shard_problem(destination, manifest: dict[str, Any]) -> str | None:
    """Why the published files do not match the manifest (a shard deleted or truncated), or None."""
    for shard in manifest.get("shards") or ():
        path = destination / shard["file"]
        try:
            size = path.size() if hasattr(path, "size") else path.stat().st_size
        except (OSError, FileNotFoundError):
            return f"shard {shard['file']} is missing"
        if size != shard["bytes"]:
            return f"shard {shard['file']} has {size:,} bytes, the manifest says {shard['bytes']:,}"
    return None


def quick_source_sha(path: Path, previous: dict | None) -> str | None:
    """`--fast-check` only: reuse the recorded sha256 when the JSONL's size and mtime are unchanged (an edit
    that keeps both is then missed; the default check hashes the content)."""
    if not previous:
        return None
    source = previous.get("source") or {}
    stat = path.stat()
    if source.get("path") == str(path) and source.get("size") == stat.st_size \
            and source.get("mtime_ns") == stat.st_mtime_ns:
        return source.get("sha256")
    return None


def clean_stale_staging(out_dir: Path) -> list[str]:
    """Remove staging folders left by interrupted runs (they never look complete, but they take space)."""
    removed = []
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
                pid = entry.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                    continue   # another ingest is running right now
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(out_dir: Path, name: str) -> Path:
    path = out_dir / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def name_parts(staging: storage.AnyPath, results: list[dict[str, Any]]) -> tuple[list[dict], dict[str, str]]:
    """The manifest's shard list in line order and {part-NNNNN.parquet: chunk file in staging}. A dataset
    with no rows gets one empty part (written into staging), so `read_parquet(DIR/<dataset>)` still works."""
    shards, parts = [], {}
    for result in sorted(results, key=lambda r: r["chunk_index"]):
        if result["shard_file"]:
            name = f"part-{len(shards):05d}.parquet"
            parts[name] = result["shard_file"]
            shards.append({"file": name, "rows": result["samples_written"], "bytes": result["shard_bytes"]})
    if not shards:
        sink = pa.BufferOutputStream()
        pq.write_table(SHARD_SCHEMA.empty_table(), sink)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes_atomic(staging / "empty.parquet", data)
        parts["part-00000.parquet"] = "empty.parquet"
        shards.append({"file": "part-00000.parquet", "rows": 0, "bytes": len(data)})
    return shards, parts


def merge_rejects(staging: storage.AnyPath, results: list[dict[str, Any]]) -> int:
    """Concatenate the chunks' reject files, in line order, into staging/_rejects.parquet; the row count."""
    tables = []
    for result in sorted(results, key=lambda r: r["chunk_index"]):
        if result["rejects_file"]:
            fs, path = storage.filesystem_and_path(staging / result["rejects_file"])
            tables.append(pq.read_table(path, filesystem=fs, schema=REJECTS_SCHEMA))
    rejects = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    with (staging / REJECTS).open("wb") as f:
        pq.write_table(rejects, f)
    return rejects.num_rows


def assemble(staging: Path, results: list[dict[str, Any]]) -> tuple[list[dict], int]:
    """Rename chunk files to part-NNNNN.parquet in line order and merge the rejects; returns (shards, rejects)."""
    shards, parts = name_parts(staging, results)
    for name, chunk in parts.items():
        os.replace(staging / chunk, staging / name)
    n_rejects = merge_rejects(staging, results)
    for result in results:
        if result["rejects_file"]:
            (staging / result["rejects_file"]).unlink()
    return shards, n_rejects


def manifest_text(manifest: dict[str, Any]) -> str:
    """The one serialisation of `_manifest.json` (local folders and object storage)."""
    return json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"


def write_manifest(folder, manifest: dict[str, Any]) -> None:
    """Replace a dataset's manifest atomically (a local Path or a storage.RemotePath: one PUT there)."""
    storage.write_text_atomic(folder / MANIFEST, manifest_text(manifest))


def publish(staging: Path, manifest: dict[str, Any], destination: Path) -> None:
    """Write the manifest last, then swap the staging folder into `destination` with renames."""
    storage.publish_tree(staging, destination, MANIFEST, manifest_text(manifest).encode("utf-8"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
