"""Plan and publish datasets: what to rebuild, the chunk tasks, the manifest and the reject limit.

Shared by the local ingest (`pipelines.ingest.driver`) and the object-storage one (`pipelines.ingest.remote`):
they differ only in where staging lives and how a finished dataset is published, which they pass in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from datasets_catalog.catalog import Catalog, DatasetSpec
from datasets_catalog.hf_mapping import HFSourceError
from datasets_catalog.tokenizer import TextTokenizer

from pipelines.ingest import state as st
from pipelines.ingest.chunk import PIXEL_ROW_GROUP_BYTES, ROW_GROUP_BYTES, ChunkTask, get_tokenizer
from pipelines.ingest.hf_source import prepare_spec
from pipelines.storage import uris as storage
from pipelines.storage.shard_schema import SCHEMA_VERSION

STATUS_BUILT, STATUS_UP_TO_DATE, STATUS_FAILED = "built", "up to date", "failed"

# Hugging Face `datasets` reads a local folder's `configs:` from this file (as from a README.md card's front
# matter). A README.md would be read as Parquet by `pandas.read_parquet(folder)` / pyarrow, which skip only
# names starting with "." or "_" (docs/ingest.md#hugging-face-datasets).
HF_CARD = ".huggingface.yaml"


def hf_card_text(name: str) -> str:
    """The folder's `datasets` metadata: `part-*.parquet` is the data (one `train` split), nothing else is."""
    card = {"pretty_name": name,
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}]}
    return ("# Written by the MedLoom ingest with the shards, so that datasets.load_dataset(<this folder>) reads\n"
            "# part-*.parquet only (_manifest.json and _rejects.parquet are not data). See docs/ingest.md.\n"
            + yaml.safe_dump(card, sort_keys=False))


def ensure_hf_card(folder) -> None:
    """Add the card to a complete dataset published before cards existed (one atomic write, no rebuild)."""
    card = folder / HF_CARD
    if not card.exists():
        storage.write_text_atomic(card, hf_card_text(folder.name))


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
    reject_examples: dict[str, list] = field(default_factory=dict)   # reason -> [line_number, detail]
    rejects_file: str = ""     # where all rejected lines are (<folder>/_rejects.parquet)
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
            reject_examples=dict(manifest.get("reject_examples", {})), rejects_file=f"{folder}/_rejects.parquet",
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
    specs = []
    for spec in catalog.select(only):
        try:
            specs.append(prepare_spec(spec))
        except HFSourceError as exc:
            raise IngestError(f"{catalog.path}: dataset {spec.name!r}, field {exc.field or 'hf'!r}: {exc}") from None
    return specs


# -- planning --------------------------------------------------------------------------------------------

@dataclass
class DatasetPlan:
    """One dataset to build: its source scan and fingerprint, where its chunks stage, and their results as
    they come back."""

    spec: DatasetSpec
    destination: Path
    staging: Path
    scan: st.SourceScan
    data_dir_digest: str | None
    settings: dict
    fingerprint: str
    results: list[dict] = field(default_factory=list)
    expected_chunks: int = 0
    why: str = ""          # why it is (re)built, printed with the "building" line


def _manifest(plan: DatasetPlan, catalog: Catalog, shards: list[dict], n_rejects: int, seconds: float) -> dict:
    spec, results = plan.spec, plan.results
    reasons: dict[str, int] = {}
    examples: dict[str, list] = {}
    for r in sorted(results, key=lambda r: r["chunk_index"]):
        for reason, count in r["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
        for reason, example in (r.get("examples") or {}).items():
            examples.setdefault(reason, example)
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
        "reject_examples": dict(sorted(examples.items())),   # reason -> [line_number, detail] of its first reject
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
            "description": spec.description, "hf_card": HF_CARD}


def _refresh(destination, manifest: dict, updates: dict) -> dict:
    """Rewrite an up-to-date dataset's manifest when only metadata (or the JSONL's mtime) changed."""
    ensure_hf_card(destination)
    if all(manifest.get(k) == v for k, v in updates.items()):
        return manifest
    manifest = {**manifest, **updates}
    st.write_manifest(destination, manifest)
    return manifest


def plan_dataset(spec: DatasetSpec, out_dir, tokenizer_name: str, reference_images: bool,
                 verify_images: bool, force: bool, catalog_path: Path = Path("?"),
                 digests: dict[Path | None, str | None] | None = None,
                 fast_check: bool = False) -> tuple[DatasetPlan | None, dict | None]:
    """(plan, None) when the dataset must be built, (None, manifest) when it is up to date.

    Up to date means: the JSONL's content hash, the image folder listing and the settings give the recorded
    fingerprint, and every shard of the manifest exists with its recorded size. `fast_check` trusts the
    JSONL's size and mtime instead of hashing it (huge sources; misses an edit that keeps both).
    `out_dir` is a local folder or a `storage.RemotePath`; the caller sets `plan.staging` (and `plan.why`).
    `digests` caches image-folder digests across the datasets of one run (several often share one data_dir).
    """
    destination = out_dir / spec.name
    previous = st.read_manifest(destination)
    settings = st.settings_of(spec, tokenizer_name, reference_images, verify_images)
    digests = {} if digests is None else digests
    if spec.data_dir not in digests:
        digests[spec.data_dir] = st.folder_digest(spec.data_dir, exclude=out_dir if isinstance(out_dir, Path) else None)
    digest = digests[spec.data_dir]
    metadata = _metadata(spec, catalog_path)
    usable = bool(previous) and previous.get("status") == "ok"
    if usable and not force and fast_check:
        sha = st.quick_source_sha(spec.jsonl_path, previous)
        if sha is not None and previous.get("fingerprint") == st.fingerprint(sha, digest, settings) \
                and st.shard_problem(destination, previous) is None:
            return None, _refresh(destination, previous, metadata)
    scan = st.scan_source(spec.jsonl_path, spec.rows_per_shard)
    fp = st.fingerprint(scan.sha256, digest, settings)
    problem = st.shard_problem(destination, previous) if usable else None
    if usable and not force and previous.get("fingerprint") == fp and problem is None:
        # same content: remember the current size and mtime (what --fast-check compares)
        source = {**previous["source"], "size": scan.size, "mtime_ns": scan.mtime_ns}
        return None, _refresh(destination, previous, {**metadata, "source": source})
    if force:
        why = "--force"
    elif not usable:
        why = "no complete earlier build"
    elif problem is not None:
        why = problem
    elif (previous.get("source") or {}).get("sha256") != scan.sha256:
        why = "the JSONL's content changed"
    elif previous.get("data_dir_digest") != digest:
        why = "the image folder changed"
    else:
        why = "the settings changed"
    plan = DatasetPlan(spec, destination, out_dir / "?", scan, digest, settings, fp)
    plan.why = why
    return plan, None


def chunk_tasks(plan: DatasetPlan, catalog: Catalog, reference_images: bool, verify_images: bool) -> list[ChunkTask]:
    """The chunk tasks of one dataset to build (the unit of parallel work), into `plan.staging`."""
    spec = plan.spec
    tasks = [ChunkTask(
        dataset=spec.name, task=spec.task.name, jsonl_path=str(spec.jsonl_path),
        data_dir=str(spec.data_dir) if spec.data_dir else None, offset=offset, length=length,
        first_line=first_line, chunk_index=index, staging_dir=str(plan.staging),
        image_transform_args=spec.image_transform_args.to_dict(),
        vit_image_transform_args=spec.vit_image_transform_args.to_dict(),
        max_image_pixels=spec.max_image_pixels, max_image_bytes=spec.max_image_bytes, tokenizer=catalog.tokenizer,
        reference_images=reference_images, verify_images=verify_images, store_pixels=spec.store_pixels,
        extra_options=spec.extra_options,
        row_group_bytes=PIXEL_ROW_GROUP_BYTES if spec.store_pixels else ROW_GROUP_BYTES,
    ) for index, (offset, length, first_line) in enumerate(plan.scan.chunks)]
    plan.expected_chunks = len(tasks)
    return tasks


def plan_all(catalog: Catalog, specs: list[DatasetSpec], out, tokenizer_name: str, reference_images: bool,
             verify_images: bool, force: bool, say: Callable[[str], None], make_staging: Callable[[DatasetSpec], Any],
             shown: Callable[[Any], str] = str, fast_check: bool = False
             ) -> tuple[dict[str, DatasetReport], list[DatasetPlan], list[ChunkTask]]:
    """Plan every selected dataset (local folder or object storage): up-to-date ones get their report, the
    others a staging area (`make_staging`) and their chunk tasks. `shown` renders a location for messages."""
    reports: dict[str, DatasetReport] = {}
    plans: list[DatasetPlan] = []
    digests: dict[Path | None, str | None] = {}
    for spec in specs:
        plan, manifest = plan_dataset(spec, out, tokenizer_name, reference_images, verify_images, force,
                                      catalog.path, digests, fast_check)
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
        say(f"[ingest] {plan.spec.name}: building ({plan.why}; {plan.spec.task.name}, {plan.scan.lines:,} lines, "
            f"{plan.expected_chunks} chunk(s)) -> {shown(plan.destination)}")
    return reports, plans, tasks


# -- publishing ------------------------------------------------------------------------------------------

Publisher = Callable[[dict, Any], None]   # (manifest, destination) -> None: parts, rejects, manifest last


def _shown(path: Any) -> Any:
    return path.display() if hasattr(path, "display") else path   # RemotePath: never print credentials


def finish_dataset(plan: DatasetPlan, catalog: Catalog, out, seconds: float, say,
                   assemble: Callable[[DatasetPlan], tuple[list[dict], int, Publisher]]) -> DatasetReport:
    """Write the manifest of a built dataset and publish it, or park it under _failed/ when it rejected too
    many rows. `assemble` names the parts and merges the rejects in staging and returns how to publish them
    (a rename on disk, a marker-last copy on object storage)."""
    spec = plan.spec
    shards, n_rejects, publish = assemble(plan)
    storage.write_text_atomic(plan.staging / HF_CARD, hf_card_text(spec.name))   # published with the shards
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


def finish_or_fail(plan: DatasetPlan, catalog: Catalog, out, seconds: float, say,
                   assemble: Callable[[DatasetPlan], tuple[list[dict], int, Publisher]],
                   discard: Callable[[DatasetPlan], None]) -> DatasetReport:
    """`finish_dataset`, but a dataset that cannot be assembled or published fails alone: the other datasets
    of the run are still published, and the exit status says which failed."""
    try:
        return finish_dataset(plan, catalog, out, seconds, say, assemble)
    except Exception as exc:  # noqa: BLE001 - this dataset only; the message names the cause
        discard(plan)
        message = (f"could not be published ({type(exc).__name__}: {exc}); it is not marked complete (no "
                   f"_manifest.json), so no reader uses it: fix the cause and run the ingest again")
        say(f"[ingest] {plan.spec.name}: FAILED: {message}")
        return DatasetReport(plan.spec.name, plan.spec.task.name, STATUS_FAILED, _shown(plan.destination),
                             rows_read=sum(r["rows_read"] for r in plan.results), message=message)
