"""The ingest driver: a catalog in, validated Parquet shards out, with Ray Data doing the parallel work.

`run_ingest(catalog, ...)` plans each dataset (fingerprint -> skip when unchanged, else cut the JSONL into
chunks: `pipelines.ingest.build`), maps `pipelines.ingest.chunk.process_chunk` over all chunks of all
datasets with Ray Data (`pipelines.ingest.execute`), shows progress as chunks finish, then assembles, checks
and publishes each dataset atomically. Workers write the shards themselves, so image bytes never cross Ray's
object store. An object-storage output (`s3://...`) goes to `pipelines.ingest.remote`, same steps.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from datasets_catalog.catalog import Catalog

from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.ingest import state as st
from pipelines.ingest.build import (
    STATUS_FAILED, DatasetPlan, IngestError, IngestReport, Publisher, finish_or_fail, load_tokenizer, plan_all,
    prepare_sources,
)
from pipelines.ingest.chunk import process_chunk
from pipelines.ingest.execute import execute_chunks
from pipelines.ingest.remote import run_ingest_remote
from pipelines.storage import uris as storage

PostIngestCheck = Callable[[Path, IngestReport], "list[str]"]

# Checks run after a local ingest: (output folder, report) -> warning lines printed under the summary.
# Empty here: the ingest knows no check; a later stage registers its own at start-up (the shards report's
# train/val leakage check: `pipelines.report.ingest_checks.register_ingest_checks`, called by jobs/ingest.py).
POST_INGEST_CHECKS: list[PostIngestCheck] = []


def register_post_ingest_check(check: PostIngestCheck) -> None:
    """Run `check` after every local ingest of this process (registering it again is a no-op)."""
    if check not in POST_INGEST_CHECKS:
        POST_INGEST_CHECKS.append(check)


def run_ingest(catalog: Catalog, out: str | Path | None = None, only: list[str] | None = None,
               force: bool = False, reference_images: bool = False, address: str | None = None,
               verify_images: bool = False, progress: bool = True, stream: TextIO | None = None,
               log: Callable[[str], None] | None = None, executor: str = "ray",
               fast_check: bool = False) -> IngestReport:
    """Ingest the selected datasets of `catalog` into `out` (default: the catalog's output_dir).

    `executor="ray"` maps the chunks with Ray Data (a running Ray is reused; else `address`/RAY_ADDRESS is
    joined or a local Ray started); `executor="local"` runs them one by one in this process (debugging,
    unit tests). Both call the same `process_chunk`. `fast_check` trusts the JSONL's size and mtime
    instead of hashing it to decide that a dataset is up to date.
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if storage.is_remote(out):   # s3://...: same plan and chunks, marker-last publish (pipelines.ingest.remote)
        return run_ingest_remote(catalog, out, only=only, force=force, reference_images=reference_images,
                                 address=address, verify_images=verify_images, progress=progress, stream=stream,
                                 log=log, executor=executor, fast_check=fast_check)
    started = time.perf_counter()
    say = log or (lambda message: print(message, file=stream or sys.stderr, flush=True))
    out_dir = Path(out).resolve() if out is not None else catalog.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IngestError(f"cannot create output folder {out_dir}: {exc.strerror}; pass --out DIR") from None
    st.clean_stale_staging(out_dir)
    tokenizer = load_tokenizer(catalog)
    register_medical_imaging()   # DICOM / NIfTI probing when chunks run in this process (workers register too)

    specs = prepare_sources(catalog, only)
    reports, plans, tasks = plan_all(catalog, specs, out_dir, tokenizer.name, reference_images, verify_images,
                                     force, say, make_staging=lambda spec: st.staging_dir(out_dir, spec.name),
                                     fast_check=fast_check)
    nodes = execute_chunks(plans, tasks, process_chunk, executor, address, say, stream, progress,
                           discard_staging=lambda plan: shutil.rmtree(plan.staging, ignore_errors=True))

    for plan in plans:
        worker_seconds = sum(r["seconds"] for r in plan.results)   # time spent on this dataset in workers
        reports[plan.spec.name] = finish_or_fail(plan, catalog, out_dir, worker_seconds, say, _assemble_local,
                                                 discard=lambda p: shutil.rmtree(p.staging, ignore_errors=True))

    report = IngestReport(str(out_dir), [reports[s.name] for s in specs], time.perf_counter() - started,
                          nodes=nodes)
    for check in POST_INGEST_CHECKS:
        report.warnings.extend(check(out_dir, report))
    return report


def _assemble_local(plan: DatasetPlan) -> tuple[list[dict], int, Publisher]:
    shards, n_rejects = st.assemble(plan.staging, plan.results)
    return shards, n_rejects, lambda manifest, destination: st.publish(plan.staging, manifest, destination)


# -- summary --------------------------------------------------------------------------------------------

TOP_REASONS = 3


def _reject_lines(d) -> list[str]:
    """A dataset's top reject reasons, each with its count and one example (line number and what to do)."""
    reasons = sorted(d.rejects_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"  {d.name}: {d.rows_rejected:,} of {d.rows_read:,} rows rejected; all of them in {d.rejects_file}"]
    for reason, count in reasons[:TOP_REASONS]:
        example = d.reject_examples.get(reason)
        shown = f": line {example[0]}: {example[1]}" if example else ""
        lines.append(f"    {reason} {count:,}{shown}")
    if len(reasons) > TOP_REASONS:
        lines.append("    " + ", ".join(f"{k} {v:,}" for k, v in reasons[TOP_REASONS:]))
    return lines


def format_summary(report: IngestReport) -> str:
    """The per-dataset table printed at the end of a run."""
    header = ("dataset", "task", "status", "read", "written", "rejected", "images", "tokens", "shards", "MB",
              "seconds")
    rows = []
    for d in report.datasets:
        rows.append((d.name, d.task, d.status, f"{d.rows_read:,}", f"{d.rows_written:,}", f"{d.rows_rejected:,}",
                     f"{d.images:,}", f"{d.num_tokens:,}", str(d.shards), f"{d.bytes / 1e6:.2f}",
                     f"{d.seconds:.2f}"))
    totals = ("TOTAL", "", "", *(f"{sum(getattr(d, k) for d in report.datasets):,}"
                                 for k in ("rows_read", "rows_written", "rows_rejected", "images", "num_tokens",
                                           "shards")),
              f"{sum(d.bytes for d in report.datasets) / 1e6:.2f}", f"{report.seconds:.1f}")
    table = [header, *rows, totals]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    right = {3, 4, 5, 6, 7, 8, 9, 10}

    def fmt(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows), "  ".join("-" * w for w in widths),
             fmt(totals)]
    rejected = [d for d in report.datasets if d.rejects_by_reason]
    if rejected:
        lines.append("")
        lines.append("rejected rows: top reasons, with the first example of each:")
        for d in rejected:
            lines.extend(_reject_lines(d))
    for d in report.datasets:
        if d.status == STATUS_FAILED:
            lines.append(f"FAILED {d.name}: {d.message}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    lines.append(f"shards in {report.output_dir}")
    return "\n".join(lines)
