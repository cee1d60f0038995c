"""Ingest into object storage (`--out s3://bucket/prefix`): the same plan, chunks and manifest as
`pipelines.ingest.driver.run_ingest` (`pipelines.ingest.build`, `pipelines.ingest.execute`), with the atomicity rule rewritten for a store that has no rename.

Workers write each chunk to a local temp folder, as for a local ingest (same `process_chunk`), then upload
its two files to `OUT/.staging-<name>-<run>/`, so no shared disk is needed between nodes. The driver then
merges the rejects there and publishes with `storage.publish_files`: the old `_manifest.json` is deleted
first, the parts are copied across (server-side), and the new manifest is written LAST. A dataset prefix
is complete iff its `_manifest.json` exists: readers (the mixture stream) refuse anything else, so an
interrupted ingest never leaves a prefix that looks complete.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, TextIO

from datasets_catalog.catalog import Catalog

from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.ingest import state as st
from pipelines.ingest.build import (
    HF_CARD, IngestError, IngestReport, finish_or_fail, load_tokenizer, plan_all, prepare_sources,
)
from pipelines.ingest.chunk import ChunkResult, ChunkTask, process_chunk
from pipelines.ingest.execute import execute_chunks
from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath


def process_chunk_remote(task: ChunkTask) -> ChunkResult:
    """`process_chunk` for a task whose staging_dir is an object-storage URI: build locally, upload."""
    remote = storage.as_path(task.staging_dir)
    local = Path(tempfile.mkdtemp(prefix="medloom-chunk-"))
    try:
        result = process_chunk(dataclasses.replace(task, staging_dir=str(local)))
        for name in (result.shard_file, result.rejects_file):
            if name:
                storage.copy_file(local / name, remote / name)
        return result
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _publish(staging: RemotePath, destination: RemotePath, renames: dict[str, str], manifest: dict) -> None:
    """Marker-last publish of exactly the parts, the merged rejects, the `datasets` card and the manifest."""
    storage.publish_files(
        {**{part: staging / chunk for part, chunk in renames.items()}, st.REJECTS: staging / st.REJECTS,
         HF_CARD: staging / HF_CARD},
        destination, st.MANIFEST, st.manifest_text(manifest).encode("utf-8"))
    staging.rmtree()


def _assemble(plan):
    """Parts named in line order (copied under their new names at publish) and the rejects merged, in staging."""
    shards, renames = st.name_parts(plan.staging, plan.results)
    n_rejects = st.merge_rejects(plan.staging, plan.results)
    return shards, n_rejects, lambda manifest, destination: _publish(plan.staging, destination, renames, manifest)


def clean_stale_staging(out: RemotePath, names: list[str]) -> list[str]:
    """Delete staging prefixes left by interrupted runs for the datasets about to be built (one ingest per
    output prefix at a time: object stores have no process ids to tell a live run from a dead one)."""
    removed = []
    for entry in out.iterdir():
        if entry.name.startswith(st.STAGING_PREFIX) and \
                any(entry.name.startswith(f"{st.STAGING_PREFIX}{n}-") for n in names):
            entry.rmtree()
            removed.append(entry.name)
    return removed


def run_ingest_remote(catalog: Catalog, out: str | RemotePath, only: list[str] | None = None, force: bool = False,
                      reference_images: bool = False, address: str | None = None, verify_images: bool = False,
                      progress: bool = True, stream: TextIO | None = None, log: Callable[[str], None] | None = None,
                      executor: str = "ray", fast_check: bool = False) -> IngestReport:
    """`run_ingest` with `out` on object storage (see the module doc). Same arguments, same report."""
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    started = time.perf_counter()
    say = log or (lambda message: print(message, file=stream or sys.stderr, flush=True))
    try:
        out = storage.as_path(out)
        out.mkdir(parents=True, exist_ok=True)
    except (storage.StorageError, OSError) as exc:
        # never print credentials from a query
        shown = out.display() if isinstance(out, RemotePath) else str(out).split("?", 1)[0]
        raise IngestError(f"cannot use output {shown}: {exc}") from None
    tokenizer = load_tokenizer(catalog)
    register_medical_imaging()   # DICOM / NIfTI probing when chunks run in this process (workers register too)

    specs = prepare_sources(catalog, only)
    clean_stale_staging(out, [s.name for s in specs])
    reports, plans, tasks = plan_all(
        catalog, specs, out, tokenizer.name, reference_images, verify_images, force, say,
        make_staging=lambda spec: out / f"{st.STAGING_PREFIX}{spec.name}-{uuid.uuid4().hex[:12]}",
        shown=RemotePath.display, fast_check=fast_check)
    nodes = execute_chunks(plans, tasks, process_chunk_remote, executor, address, say, stream, progress,
                           discard_staging=lambda plan: plan.staging.rmtree())

    for plan in plans:
        reports[plan.spec.name] = finish_or_fail(plan, catalog, out, sum(r["seconds"] for r in plan.results),
                                                 say, _assemble, discard=lambda p: p.staging.rmtree())
    report = IngestReport(out.display(), [reports[s.name] for s in specs], time.perf_counter() - started,
                          nodes=nodes)
    report.warnings.append("post-ingest checks (leakage, duplicates) read local folders and were skipped for "
                           "object storage; run jobs/report.py on a local copy if you need them")
    return report
