"""Resolve a `MixtureConfig` against the catalog and the shards: which rows each group reads.

All user mistakes become one `MixtureConfigError` that says what to do: unknown dataset (close matches),
no shards yet (the ingest command to run), task kind mismatch, a missing or unreadable shard file (named,
with the ingest command that rebuilds it), empty groups. Every dataset is checked before raising, so the
error carries all problems at once (`MixtureConfigError.problems`); `check_mixture` is the same check as a
list, the driver-side preflight of jobs/plan.py and jobs/train.py.
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets_catalog.catalog import Catalog, CatalogError, load_catalog
from datasets_catalog.task_kinds import TaskKind, UnknownTaskKind, resolve_task_kind
from datasets_catalog.transforms import ImageTransformArgs

from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.mixture.config import GroupConfig, MixtureConfig, MixtureConfigError
from pipelines.mixture.order import MAX_BLOCK_ROWS
from pipelines.storage.shard_reader import ShardLayout, ShardReadError
from pipelines.storage.shard_schema import PIXEL_SHARD_READ_COLUMNS, SCHEMA_VERSION

log = logging.getLogger(__name__)


@dataclass
class DatasetSource:
    name: str
    task: TaskKind
    shard_dir: Path
    layout: ShardLayout
    data_dir: str | None
    manifest: dict
    # set when the config's transforms differ from the shards': sizes are recomputed at read time
    recompute: tuple[ImageTransformArgs, ImageTransformArgs] | None = None

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def row_columns(self) -> tuple[str, ...] | None:
        """Columns to read for training rows: all (None), or all but the original image bytes when the
        shards store pixels at the configured sizes (store_pixels, no recompute): far fewer bytes per row."""
        stored = (self.manifest.get("settings") or {}).get("store_pixels")
        return PIXEL_SHARD_READ_COLUMNS if stored and self.recompute is None else None


@dataclass
class GroupSource:
    config: GroupConfig
    index: int
    datasets: list[DatasetSource]
    # blocks: contiguous row runs inside one row group of one dataset, in group order
    block_ds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    block_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    block_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def total(self) -> int:
        return int(self.block_len.sum())


@dataclass
class ResolvedMixture:
    config: MixtureConfig
    catalog: Catalog
    shards_dir: Path
    groups: list[GroupSource]
    notes: list[str]


class _NoShards(MixtureConfigError):
    """A dataset of the catalog that has not been ingested into the shards folder yet."""


def _manifest_transforms(manifest: dict) -> tuple[ImageTransformArgs | None, ImageTransformArgs | None]:
    t = manifest.get("transforms") or {}
    vae = t.get("image_transform_args") or t.get("vae")
    vit = t.get("vit_image_transform_args") or t.get("vit")
    try:
        return (ImageTransformArgs(**vae) if vae else None, ImageTransformArgs(**vit) if vit else None)
    except (TypeError, ValueError):
        return None, None


def _load_dataset(name: str, group: GroupConfig, catalog: Catalog, shards_dir: Path, cfg: MixtureConfig,
                  notes: list[str]) -> DatasetSource:
    where = f"{cfg.path or '<mixture config>'}" + (f", line {group.line}" if group.line else "")
    if name not in catalog.datasets:
        close = difflib.get_close_matches(name, list(catalog.datasets), n=3, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise MixtureConfigError(f"{where}: group {group.name!r} names dataset {name!r}, which is not in the "
                                 f"catalog {catalog.path}.{hint} Known datasets: {', '.join(catalog.datasets)}")
    spec = catalog.datasets[name]
    if spec.task.name != group.task.name:
        raise MixtureConfigError(
            f"{where}: dataset {name!r} is a {spec.task.upstream} ({spec.task.name}) dataset in the catalog, but "
            f"the config lists it under {group.key} ({group.task.name}); move it under a "
            f"'{spec.task.upstream}:' key or fix its task in {catalog.path}")
    folder = shards_dir / name
    manifest_path = folder / "_manifest.json"
    if not manifest_path.is_file():
        raise _NoShards(
            f"{where}: no shards for dataset {name!r} in {folder} yet. Run: python jobs/ingest.py "
            f"{catalog.path} --only {name}" + (f" --out {shards_dir}" if shards_dir != catalog.output_dir else ""))
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise MixtureConfigError(f"{manifest_path}: unreadable manifest ({exc}); re-run python jobs/ingest.py "
                                 f"{catalog.path} --only {name} --force") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise MixtureConfigError(f"{manifest_path}: shards have schema version {manifest.get('schema_version')}, "
                                 f"this code reads {SCHEMA_VERSION}; re-run python jobs/ingest.py {catalog.path} "
                                 f"--only {name} --force")
    try:
        shard_task = resolve_task_kind(manifest.get("task", ""))
    except UnknownTaskKind:
        shard_task = None
    if shard_task is not None and shard_task.name != spec.task.name:
        raise MixtureConfigError(f"{manifest_path}: shards were built as task {shard_task.name} but the catalog "
                                 f"says {spec.task.name}; re-run python jobs/ingest.py {catalog.path} --only {name}")
    files = [folder / s["file"] for s in manifest.get("shards", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MixtureConfigError(f"{missing[0]}{more}: shard file listed in _manifest.json is missing; re-run the "
                                 f"ingest with --force --only {name} (python jobs/ingest.py {catalog.path} "
                                 f"--force --only {name})")
    try:
        layout = ShardLayout.scan(files)   # opens every shard's footer: a truncated file fails here
    except ShardReadError as exc:
        raise MixtureConfigError(f"{exc.path}: {exc.problem}; re-run the ingest with --force --only {name} "
                                 f"(python jobs/ingest.py {catalog.path} --force --only {name})") from None
    source = DatasetSource(name, spec.task, folder, layout, manifest.get("data_dir")
                           or (str(spec.data_dir) if spec.data_dir else None), manifest)
    built_vae, built_vit = _manifest_transforms(manifest)
    want_vae = group.image_transform_args or built_vae or spec.image_transform_args
    want_vit = group.vit_image_transform_args or built_vit or spec.vit_image_transform_args
    if (built_vae, built_vit) != (want_vae, want_vit):
        source.recompute = (want_vae, want_vit)
        note = (f"dataset {name!r} (group {group.name}): the config's image transforms differ from those the "
                f"shards were built with; VAE/ViT sizes and num_tokens are recomputed from the stored image "
                f"sizes (no re-ingest needed)")
        notes.append(note)
        log.warning(note)
    return source


def _clip_notes(group: GroupSource, cfg: MixtureConfig) -> list[str]:
    """num_used_data beyond what the shards hold is used as "all rows": say so with the real size."""
    where = f"{cfg.path or '<mixture config>'}" + (f", line {group.config.line}" if group.config.line else "")
    out = []
    for ds, use in zip(group.datasets, group.config.datasets):
        if use.limit is not None and use.limit > ds.rows:
            out.append(f"{where}: group {group.config.name!r}: num_used_data {use.limit} for dataset {ds.name!r} "
                       f"exceeds its {ds.rows} rows; all {ds.rows} are used")
    end = group.config.row_range[1]
    rows = sum(ds.rows for ds in group.datasets)
    if end is not None and end > rows:
        out.append(f"{where}: group {group.config.name!r}: num_used_data end {end} exceeds the group's {rows} "
                   f"rows; rows up to {rows} are used")
    for note in out:
        log.warning(note)
    return out


def _blocks(group: GroupSource) -> None:
    start, end = group.config.row_range
    ds_idx, rows, lens = [], [], []
    offset = 0   # group-row index of the current dataset's first row
    for di, (ds, use) in enumerate(zip(group.datasets, group.config.datasets)):   # built in config order
        n = ds.rows if use.limit is None else min(use.limit, ds.rows)
        lo, hi = max(start - offset, 0), n if end is None else min(n, end - offset)
        offset += n
        if hi <= lo:
            continue
        for g_start, g_rows in zip(ds.layout.rg_start.tolist(), ds.layout.rg_rows.tolist()):
            a, b = max(g_start, lo), min(g_start + g_rows, hi)
            while a < b:
                step = min(b - a, MAX_BLOCK_ROWS)
                ds_idx.append(di)
                rows.append(a)
                lens.append(step)
                a += step
    group.block_ds = np.asarray(ds_idx, dtype=np.int64)
    group.block_row = np.asarray(rows, dtype=np.int64)
    group.block_len = np.asarray(lens, dtype=np.int64)


def resolve_sources(cfg: MixtureConfig) -> ResolvedMixture:
    """Load the catalog, find every dataset's shards and lay out each group's rows. Raises one
    MixtureConfigError carrying every problem found (each dataset is checked once)."""
    register_medical_imaging()   # the catalog's DICOM/NIfTI option sections are checked as at ingest
    catalog_path = cfg.catalog_path()   # a catalog: key, --catalog, or the catalog/*.yaml search
    try:
        catalog = load_catalog(catalog_path)
    except CatalogError as exc:
        raise MixtureConfigError(str(exc)) from None
    shards_dir = cfg.shards or catalog.output_dir
    folder_missing = isinstance(shards_dir, Path) and not shards_dir.exists()
    notes: list[str] = []
    problems: list[str] = []
    unbuilt: list[str] = []
    loaded: dict[str, DatasetSource | None] = {}
    failed: set[str] = set()
    groups = []
    for gi, gc in enumerate(cfg.groups):
        sources = []
        for use in gc.datasets:
            cache_key = f"{use.name}|{gc.image_transform_args}|{gc.vit_image_transform_args}"
            if cache_key not in loaded:
                loaded[cache_key] = None
                if use.name not in failed:
                    try:
                        loaded[cache_key] = _load_dataset(use.name, gc, catalog, shards_dir, cfg, notes)
                    except _NoShards as exc:
                        failed.add(use.name)
                        unbuilt.append(use.name)
                        if not folder_missing:
                            problems.append(str(exc))
                    except MixtureConfigError as exc:
                        problems.extend(exc.problems)
                        failed.add(use.name)
            if loaded[cache_key] is not None:
                sources.append(loaded[cache_key])
        if len(sources) < len(gc.datasets):
            continue   # its problems are reported; its rows cannot be laid out
        group = GroupSource(gc, gi, sources)
        _blocks(group)
        notes.extend(_clip_notes(group, cfg))
        used = gc.weight > 0 or gc.is_mandatory or any(s.weights[gi] > 0 for s in cfg.stages)
        if group.total == 0 and used:
            where = f"{cfg.path or '<mixture config>'}" + (f", line {gc.line}" if gc.line else "")
            problems.append(f"{where}: group {gc.name!r} has no rows (datasets "
                            f"{', '.join(u.name for u in gc.datasets)} are empty or num_used_data "
                            f"selects nothing); give it weight 0 (in every stage too) or fix num_used_data")
        groups.append(group)
    if folder_missing and unbuilt:   # one line for the folder, not one per dataset
        out = f" --out {shards_dir}" if shards_dir != catalog.output_dir else ""
        problems.insert(0, f"{cfg.path or '<mixture config>'}: no shards yet: the shards folder {shards_dir} does "
                           f"not exist. Run: python jobs/ingest.py {catalog.path} --only {','.join(unbuilt)}{out} "
                           f"(or name the folder the ingest wrote with --shards or a shards: key)")
    if problems:
        raise MixtureConfigError.of(problems)
    return ResolvedMixture(cfg, catalog, shards_dir, groups, notes)


def check_mixture(cfg: MixtureConfig) -> list[str]:
    """Every problem of a mixture against its catalog and shards, one line each ([] when it can be trained
    on): catalog, dataset names, task kinds, shards present, every shard's footer readable, empty groups.
    Reads metadata only (no row data), so it answers in well under a second on the example. Notes (such as
    transforms recomputed at read time) are left to the jobs that report them, not logged here."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        resolve_sources(cfg)
    except MixtureConfigError as exc:
        return exc.problems
    finally:
        log.setLevel(level)
    return []
