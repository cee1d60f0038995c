"""The ingest driver: a catalog in, validated Parquet shards out, with Ray Data doing the parallel work.

`run_ingest(catalog, ...)` plans each dataset (fingerprint -> skip when unchanged, else cut the JSONL into
chunks), maps `pipelines.ingest.chunk.process_chunk` over all chunks of all datasets with Ray Data
(`from_items` -> `map_batches`), shows progress as chunks finish, then assembles, checks and publishes each
dataset atomically. Workers write the shards themselves, so image bytes never cross Ray's object store.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from datasets_catalog.catalog import Catalog, DatasetSpec
from datasets_catalog.hooks import resolve_hook
from datasets_catalog.tokenizer import TextTokenizer

from pipelines.ingest import state as st
from pipelines.storage import uris as storage
from pipelines.ingest.chunk import PIXEL_ROW_GROUP_BYTES, ROW_GROUP_BYTES, ChunkTask, get_tokenizer, process_chunk
from pipelines.storage.shard_schema import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent
STATUS_BUILT, STATUS_UP_TO_DATE, STATUS_FAILED = "built", "up to date", "failed"


class IngestError(RuntimeError):
    """A problem the user must fix before ingest can run (bad tokenizer, unwritable output, ...)."""


@dataclass
class DatasetReport:
    name: str
    task: str
    status: str
    folder: str
    rows_read: int = 0
    rows_written: int = 0
    samples_written: int = 0
    rows_rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    images: int = 0
    text_tokens: int = 0
    num_tokens: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    message: str = ""

    @classmethod
    def from_manifest(cls, manifest: dict, status: str, folder: Path, message: str = "") -> "DatasetReport":
        return cls(
            name=manifest["dataset"], task=manifest["task"], status=status, folder=str(folder),
            rows_read=manifest["rows_read"], rows_written=manifest["rows_written"],
            samples_written=manifest.get("samples_written", manifest["rows_written"]),
            rows_rejected=manifest["rows_rejected"], rejects_by_reason=dict(manifest.get("rejects_by_reason", {})),
            images=manifest["images"], text_tokens=manifest.get("text_tokens", 0),
            num_tokens=manifest.get("num_tokens", 0), shards=len(manifest["shards"]),
            bytes=sum(s["bytes"] for s in manifest["shards"]),
            seconds=manifest.get("seconds", 0.0) if status != STATUS_UP_TO_DATE else 0.0, message=message,
        )


@dataclass
class IngestReport:
    output_dir: str
    datasets: list[DatasetReport]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)   # Ray node id -> chunks it processed (executor="ray")

    @property
    def ok(self) -> bool:
        return all(d.status != STATUS_FAILED for d in self.datasets)


# Extensions (issue 7: leakage between train and val) add checks run after ingest: (output_dir, report) ->
# warning lines printed under the summary. Entries are callables or "module:function" strings (imported
# when the check runs; a module that is not installed is skipped).
POST_INGEST_CHECKS: list[Callable[[Path, IngestReport], list[str]] | str] = [
    "pipelines.imaging.medical:ingest_leakage_check",
]


def load_tokenizer(catalog: Catalog) -> TextTokenizer:
    """The catalog's tokenizer, or one clear IngestError (its name goes into every fingerprint)."""
    try:
        return get_tokenizer(catalog.tokenizer)   # the per-process cache the chunk workers use too
    except (OSError, ValueError, KeyError) as exc:
        raise IngestError(f"{catalog.path}: tokenizer {catalog.tokenizer!r} cannot be loaded ({exc}); use "
                          f"'builtin' or a folder with Qwen2 tokenizer files") from None


def reject_limit_exceeded(manifest: dict, spec: DatasetSpec) -> str | None:
    """Why a built dataset fails its `max_reject_fraction` (the top reasons named), or None if it passes."""
    fraction = manifest["rows_rejected"] / manifest["rows_read"] if manifest["rows_read"] else 0.0
    if fraction <= spec.max_reject_fraction:
        return None
    top = ", ".join(f"{k} {v}" for k, v in sorted(manifest["rejects_by_reason"].items(), key=lambda kv: -kv[1])[:3])
    return (f"{manifest['rows_rejected']} of {manifest['rows_read']} rows rejected ({fraction:.0%}), over "
            f"max_reject_fraction {spec.max_reject_fraction:.0%} ({top})")


def prepare_sources(catalog: Catalog, only: list[str] | None) -> list[DatasetSpec]:
    """The selected datasets, with Hugging Face sources (`source: hf`) materialised into their JSONL cache."""
    from pipelines.ingest.hf_source import HFSourceError, prepare_spec

    specs = []
    for spec in catalog.select(only):
        try:
            specs.append(prepare_spec(spec))
        except HFSourceError as exc:
            raise IngestError(f"{catalog.path}: dataset {spec.name!r}, field {exc.field or 'hf'!r}: {exc}") from None
    return specs


# -- progress -------------------------------------------------------------------------------------------

class Progress:
    """One status line on stderr, redrawn in place on a terminal, at most every few seconds otherwise."""

    def __init__(self, total_rows: int, total_chunks: int, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total_rows, self.total_chunks = total_rows, total_chunks
        self.rows = self.chunks = self.bytes = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.last = 0.0

    def update(self, result: dict[str, Any]) -> None:
        self.rows += result["rows_read"] + result["blank_lines"]
        self.chunks += 1
        self.bytes += result["shard_bytes"]
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 2.0 and self.chunks < self.total_chunks):
            return
        self.last = now
        elapsed = now - self.started
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        line = (f"[ingest] chunks {self.chunks}/{self.total_chunks}  lines {self.rows:,}/{self.total_rows:,}  "
                f"{self.bytes / 1e6:,.1f} MB written  {rate:,.0f} lines/s  {elapsed:.1f} s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- Ray ------------------------------------------------------------------------------------------------

def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (Ray itself retries for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    if target == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot reach the Ray cluster at {address!r} ({exc}); check the address, start one "
                          f"with `ray start --head`, or drop --address / RAY_ADDRESS to use a local Ray") from None


def _ensure_ray(address: str | None, say: Callable[[str], None] = lambda m: None) -> bool:
    """Use a running Ray if there is one; else join `address`/RAY_ADDRESS or start a local one.
    Returns True when this call started (and so must stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    address = address or os.environ.get("RAY_ADDRESS")
    say(f"[ingest] joining Ray at {address}" if address else
        f"[ingest] starting a local Ray ({os.cpu_count() or 2} CPUs; takes a few seconds)")
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "runtime_env": env}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise IngestError(f"cannot join the Ray cluster at {address!r} ({exc}); start one with "
                              f"`ray start --head`, or drop --address / RAY_ADDRESS to use a local Ray") from None
    else:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False,
                 object_store_memory=256 * 1024 * 1024, **quiet)
    return True


def _process_batch(batch: dict[str, Any]) -> dict[str, list]:
    """Ray Data UDF: one batch of chunk tasks -> one batch of chunk results (small dicts only)."""
    import json as _json

    keys = list(batch)
    n = len(batch[keys[0]])
    out: dict[str, list] = {"result": []}
    for i in range(n):
        task = ChunkTask(**_json.loads(batch["task"][i]))
        result = process_chunk(task).to_dict()
        result["node_id"] = _node_id()   # which node did the work (IngestReport.nodes)
        out["result"].append(_json.dumps(result))
    return out


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: no node id
        return None


def _run_chunks(tasks: list[ChunkTask], on_result: Callable[[dict], None], address: str | None,
                say: Callable[[str], None] = lambda m: None) -> None:
    import json as _json

    import ray
    import ray.data

    started_here = _ensure_ray(address, say)
    for name in ("ray.data", "ray"):   # our progress line replaces Ray Data's own log lines
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False            # we print our own progress line
        ctx.execution_options.preserve_order = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        items = [{"task": _json.dumps(t.to_dict(), default=str)} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_process_batch, batch_size=1, batch_format="numpy", num_cpus=1,
                            zero_copy_batch=False)
        for row in ds.iter_rows():
            on_result(_json.loads(row["result"]))
    finally:
        if started_here:
            ray.shutdown()


# -- the job --------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    spec: DatasetSpec
    destination: Path
    staging: Path
    scan: st.SourceScan
    data_dir_digest: str | None
    settings: dict
    fingerprint: str
    results: list[dict] = field(default_factory=list)
    expected_chunks: int = 0


def _manifest(plan: _Plan, catalog: Catalog, shards: list[dict], n_rejects: int, seconds: float) -> dict:
    spec, results = plan.spec, plan.results
    reasons: dict[str, int] = {}
    for r in results:
        for reason, count in r["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    rows_read = sum(r["rows_read"] for r in results)
    rows_written = sum(r["rows_written"] for r in results)
    rows_rejected = sum(r["rows_rejected"] for r in results)
    assert rows_rejected == n_rejects, (rows_rejected, n_rejects)
    return {
        "dataset": spec.name, "task": spec.task.name, "task_upstream": spec.task.upstream, "status": "ok",
        "schema_version": SCHEMA_VERSION, "ingest_version": st.INGEST_VERSION,
        **_metadata(spec, catalog.path),
        "rows_read": rows_read, "rows_written": rows_written, "rows_rejected": rows_rejected,
        "samples_written": sum(r["samples_written"] for r in results),
        "blank_lines": sum(r["blank_lines"] for r in results),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "images": sum(r["images"] for r in results),
        "image_bytes": sum(r["image_bytes"] for r in results),
        "text_tokens": sum(r["text_tokens"] for r in results),
        "num_tokens": sum(r["num_tokens"] for r in results),
        "source": {"path": plan.scan.path, "size": plan.scan.size, "mtime_ns": plan.scan.mtime_ns,
                   "sha256": plan.scan.sha256, "lines": plan.scan.lines},
        "data_dir_digest": plan.data_dir_digest,
        "transforms": plan.settings["transforms"],
        "tokenizer": plan.settings["tokenizer"],
        "reference_images": plan.settings["reference_images"],
        "settings": plan.settings,
        "fingerprint": plan.fingerprint,
        "shards": shards,
        "created_at": st.now_iso(),
        "seconds": round(seconds, 3),
    }


def _metadata(spec: DatasetSpec, catalog_path: Path) -> dict[str, Any]:
    """Manifest fields that describe a dataset without changing its rows (updated in place, no rebuild)."""
    return {"catalog": str(Path(catalog_path).resolve()),
            "data_dir": str(spec.data_dir) if spec.data_dir else None,
            "split": spec.split, "modality": spec.modality, "license": spec.license,
            "description": spec.description}


def _refresh(destination, manifest: dict, updates: dict) -> dict:
    """Rewrite an up-to-date dataset's manifest when only metadata (or the JSONL's mtime) changed."""
    if all(manifest.get(k) == v for k, v in updates.items()):
        return manifest
    manifest = {**manifest, **updates}
    st.write_manifest(destination, manifest)
    return manifest


def plan_dataset(spec: DatasetSpec, out_dir, tokenizer_name: str, reference_images: bool,
                 verify_images: bool, force: bool, catalog_path: Path = Path("?"),
                 digests: dict[Path | None, str | None] | None = None) -> tuple[_Plan | None, dict | None]:
    """(plan, None) when the dataset must be built, (None, manifest) when it is up to date.

    `out_dir` is a local folder or a `storage.RemotePath`; the caller sets `plan.staging`. `digests` caches
    image-folder digests across the datasets of one run (several datasets often share one data_dir).
    """
    destination = out_dir / spec.name
    previous = st.read_manifest(destination)
    settings = st.settings_of(spec, tokenizer_name, reference_images, verify_images)
    digests = {} if digests is None else digests
    if spec.data_dir not in digests:
        digests[spec.data_dir] = st.folder_digest(spec.data_dir, exclude=out_dir if isinstance(out_dir, Path) else None)
    digest = digests[spec.data_dir]
    metadata = _metadata(spec, catalog_path)
    if previous and previous.get("status") == "ok" and not force:
        sha = st.quick_source_sha(spec.jsonl_path, previous)
        if sha is not None and previous.get("fingerprint") == st.fingerprint(sha, digest, settings):
            return None, _refresh(destination, previous, metadata)
    scan = st.scan_source(spec.jsonl_path, spec.rows_per_shard)
    fp = st.fingerprint(scan.sha256, digest, settings)
    if previous and previous.get("status") == "ok" and not force and previous.get("fingerprint") == fp:
        # touched but identical bytes: remember the new mtime so the next run skips the re-hash
        source = {**previous["source"], "size": scan.size, "mtime_ns": scan.mtime_ns}
        return None, _refresh(destination, previous, {**metadata, "source": source})
    return _Plan(spec, destination, out_dir / "?", scan, digest, settings, fp), None


def chunk_tasks(plan: _Plan, catalog: Catalog, reference_images: bool, verify_images: bool) -> list[ChunkTask]:
    """The chunk tasks of one dataset to build (the unit of parallel work), into `plan.staging`."""
    spec = plan.spec
    tasks = [ChunkTask(
        dataset=spec.name, task=spec.task.name, jsonl_path=str(spec.jsonl_path),
        data_dir=str(spec.data_dir) if spec.data_dir else None, offset=offset, length=length,
        first_line=first_line, chunk_index=index, staging_dir=str(plan.staging),
        image_transform_args=spec.image_transform_args.to_dict(),
        vit_image_transform_args=spec.vit_image_transform_args.to_dict(),
        max_image_pixels=spec.max_image_pixels, tokenizer=catalog.tokenizer,
        reference_images=reference_images, verify_images=verify_images, store_pixels=spec.store_pixels,
        extra_options=spec.extra_options,
        row_group_bytes=PIXEL_ROW_GROUP_BYTES if spec.store_pixels else ROW_GROUP_BYTES,
    ) for index, (offset, length, first_line) in enumerate(plan.scan.chunks)]
    plan.expected_chunks = len(tasks)
    return tasks


def plan_all(catalog: Catalog, specs: list[DatasetSpec], out, tokenizer_name: str, reference_images: bool,
             verify_images: bool, force: bool, say: Callable[[str], None], make_staging: Callable[[DatasetSpec], Any],
             shown: Callable[[Any], str] = str) -> tuple[dict[str, DatasetReport], list[_Plan], list[ChunkTask]]:
    """Plan every selected dataset (local folder or object storage): up-to-date ones get their report, the
    others a staging area (`make_staging`) and their chunk tasks. `shown` renders a location for messages."""
    reports: dict[str, DatasetReport] = {}
    plans: list[_Plan] = []
    digests: dict[Path | None, str | None] = {}
    for spec in specs:
        plan, manifest = plan_dataset(spec, out, tokenizer_name, reference_images, verify_images, force,
                                      catalog.path, digests)
        if plan is None:
            reports[spec.name] = DatasetReport.from_manifest(manifest, STATUS_UP_TO_DATE, shown(out / spec.name),
                                                             "inputs and settings unchanged: nothing to do")
            say(f"[ingest] {spec.name}: up to date (inputs and settings unchanged), skipped")
            continue
        plan.staging = make_staging(spec)
        plans.append(plan)
    tasks: list[ChunkTask] = []
    for plan in plans:
        tasks.extend(chunk_tasks(plan, catalog, reference_images, verify_images))
        say(f"[ingest] {plan.spec.name}: building ({plan.spec.task.name}, {plan.scan.lines:,} lines, "
            f"{plan.expected_chunks} chunk(s)) -> {shown(plan.destination)}")
    return reports, plans, tasks


def execute_chunks(plans: list[_Plan], tasks: list[ChunkTask], executor: str, address: str | None,
                   say: Callable[[str], None], stream: TextIO | None, progress: bool,
                   discard_staging: Callable[[_Plan], None]) -> dict[str, int]:
    """Run every chunk (Ray Data or in-process), collect results into their plans; {node id: chunks}.

    If any chunk did not come back, every plan's staging is discarded and the error propagates: nothing
    half-built is ever published.
    """
    by_name = {plan.spec.name: plan for plan in plans}
    nodes: dict[str, int] = {}
    if not tasks:
        return nodes
    bar = Progress(sum(p.scan.lines for p in plans), len(tasks), stream, enabled=progress)

    def on_result(result: dict) -> None:
        by_name[result["dataset"]].results.append(result)
        if result.get("node_id"):
            nodes[result["node_id"]] = nodes.get(result["node_id"], 0) + 1
        bar.update(result)

    try:
        if executor == "ray":
            _run_chunks(tasks, on_result, address, say)
        else:
            for task in tasks:
                on_result(process_chunk(task).to_dict())
    finally:
        bar.close()
        if any(len(p.results) != p.expected_chunks for p in plans):
            for plan in plans:
                discard_staging(plan)
    return nodes


def run_ingest(catalog: Catalog, out: str | Path | None = None, only: list[str] | None = None,
               force: bool = False, reference_images: bool = False, address: str | None = None,
               verify_images: bool = False, progress: bool = True, stream: TextIO | None = None,
               log: Callable[[str], None] | None = None, executor: str = "ray") -> IngestReport:
    """Ingest the selected datasets of `catalog` into `out` (default: the catalog's output_dir).

    `executor="ray"` maps the chunks with Ray Data (a running Ray is reused; else `address`/RAY_ADDRESS is
    joined or a local Ray started); `executor="local"` runs them one by one in this process (debugging,
    unit tests). Both call the same `process_chunk`.
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if storage.is_remote(out):   # s3://...: same plan and chunks, marker-last publish (pipelines.ingest.remote)
        from pipelines.ingest.remote import run_ingest_remote

        return run_ingest_remote(catalog, out, only=only, force=force, reference_images=reference_images,
                                 address=address, verify_images=verify_images, progress=progress, stream=stream,
                                 log=log, executor=executor)
    started = time.perf_counter()
    say = log or (lambda message: print(message, file=stream or sys.stderr, flush=True))
    out_dir = Path(out).resolve() if out is not None else catalog.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IngestError(f"cannot create output folder {out_dir}: {exc.strerror}; pass --out DIR") from None
    st.clean_stale_staging(out_dir)
    tokenizer = load_tokenizer(catalog)

    specs = prepare_sources(catalog, only)
    reports, plans, tasks = plan_all(catalog, specs, out_dir, tokenizer.name, reference_images, verify_images,
                                     force, say, make_staging=lambda spec: st.staging_dir(out_dir, spec.name))
    nodes = execute_chunks(plans, tasks, executor, address, say, stream, progress,
                           discard_staging=lambda plan: shutil.rmtree(plan.staging, ignore_errors=True))

    for plan in plans:
        worker_seconds = sum(r["seconds"] for r in plan.results)   # time spent on this dataset in workers
        reports[plan.spec.name] = finish_dataset(plan, catalog, out_dir, worker_seconds, say, _assemble_local)

    report = IngestReport(str(out_dir), [reports[s.name] for s in specs], time.perf_counter() - started,
                          nodes=nodes)
    for check in POST_INGEST_CHECKS:
        function = resolve_hook(check)
        if function is not None:
            report.warnings.extend(function(out_dir, report))
    return report


Publisher = Callable[[dict, Any], None]   # (manifest, destination) -> None: parts, rejects, manifest last


def _shown(path: Any) -> Any:
    return path.display() if hasattr(path, "display") else path   # RemotePath: never print credentials


def finish_dataset(plan: _Plan, catalog: Catalog, out, seconds: float, say,
                   assemble: Callable[[_Plan], tuple[list[dict], int, Publisher]]) -> DatasetReport:
    """Write the manifest of a built dataset and publish it, or park it under _failed/ when it rejected too
    many rows. `assemble` names the parts and merges the rejects in staging and returns how to publish them
    (a rename on disk, a marker-last copy on object storage)."""
    spec = plan.spec
    shards, n_rejects, publish = assemble(plan)
    manifest = _manifest(plan, catalog, shards, n_rejects, seconds)
    assert manifest["rows_read"] == manifest["rows_written"] + manifest["rows_rejected"]
    why = reject_limit_exceeded(manifest, spec)
    if why is not None:
        manifest["status"] = "failed"
        failed = out / st.FAILED_DIR / spec.name
        publish(manifest, failed)
        storage.unpublish(plan.destination, st.MANIFEST)   # stale shards of older inputs must not be trained on
        message = f"{why}; see {_shown(failed / st.REJECTS)}"
        say(f"[ingest] {spec.name}: FAILED: {message}")
        return DatasetReport.from_manifest(manifest, STATUS_FAILED, _shown(failed), message)
    publish(manifest, plan.destination)
    return DatasetReport.from_manifest(manifest, STATUS_BUILT, _shown(plan.destination))


def _assemble_local(plan: _Plan) -> tuple[list[dict], int, Publisher]:
    shards, n_rejects = st.assemble(plan.staging, plan.results)
    return shards, n_rejects, lambda manifest, destination: st.publish(plan.staging, manifest, destination)


# -- summary --------------------------------------------------------------------------------------------

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
        lines.append("rejected rows by reason (details: <dataset>/_rejects.parquet):")
        for d in rejected:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(d.rejects_by_reason.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {d.name}: {reasons}")
    for d in report.datasets:
        if d.status == STATUS_FAILED:
            lines.append(f"FAILED {d.name}: {d.message}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    lines.append(f"shards in {report.output_dir}")
    return "\n".join(lines)
