"""Checkpoints on object storage (`--storage_path s3://bucket/runs`), with no shared disk between nodes.

Saving (`begin_remote_save`, `upload_files`, `seal_remote`): every rank writes its own files (its stream
state, its optimizer shard under FSDP) into a node-local staging folder and uploads them itself to
`STORAGE/<run>/checkpoints/<step>/`; after a barrier rank 0 uploads the shared files (weights, scheduler,
train state, inference files), checks that every file the checkpoint needs is there, and writes
`COMPLETE.json` LAST. A remote checkpoint is complete only when its marker exists and every file the
marker lists is present; rotation (`rotate_remote`) counts and deletes complete ones only (marker first),
plus dead incomplete ones older than the newest complete one.

Resuming (`choose_remote`, `fetch_checkpoint`, `fetch_file`): rank 0 picks the step (the one Ray Train
restarts from, else the newest complete one) and broadcasts it; every rank downloads what it needs (shared
files, the stream states, later its own optimizer shard) into a node-local folder. Ranks that share a node
share the download (a per-file lock), so weights are fetched once per node. No rank reads another node's disk.

`mirror_checkpoint` / `restore_newest` (whole-folder upload / download) remain for single-folder use.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath

MARKER = "COMPLETE.json"          # trainer.checkpointing.MARKER (kept in sync by a test)
LOCAL_RUNS_ENV = "MEDLOOM_LOCAL_RUNS"


def local_runs_root(storage_path: str) -> Path:
    """Where the run directory lives on this machine when storage_path is remote: $MEDLOOM_LOCAL_RUNS,
    else ./runs (git-ignored). Local storage paths are their own root."""
    if storage.is_remote(storage_path):
        return Path(os.environ.get(LOCAL_RUNS_ENV) or "runs").expanduser().resolve()
    return Path(storage_path).expanduser().resolve()


def remote_checkpoint_root(storage_path: Optional[str], run_name: str) -> Optional[RemotePath]:
    """STORAGE/<run>/checkpoints for a remote storage_path; None for a local one."""
    if not storage_path or not storage.is_remote(storage_path):
        return None
    return storage.as_path(storage_path) / run_name / "checkpoints"


def _marker(step_dir) -> Optional[dict]:
    try:
        return json.loads((step_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def remote_is_complete(step_dir: RemotePath) -> bool:
    marker = _marker(step_dir)
    if not marker:
        return False
    present = {rel for rel, _ in storage.files_under(step_dir)}
    return all(name in present for name in marker.get("files", [])) and "model.safetensors" in present


def remote_steps(root: RemotePath) -> list[tuple[int, RemotePath]]:
    """(step, prefix) of every all-digit sub-prefix, oldest first."""
    return sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit())


def newest_remote_complete(root: RemotePath) -> Optional[RemotePath]:
    for _, path in reversed(remote_steps(root)):
        if remote_is_complete(path):
            return path
    return None


def mirror_checkpoint(local_step_dir: Path, root: RemotePath, keep: int) -> RemotePath:
    """Upload one complete local checkpoint (marker last), then keep only the newest `keep` remote ones."""
    target = root / local_step_dir.name
    storage.upload_tree(local_step_dir, target, marker=MARKER)
    complete = [(s, p) for s, p in remote_steps(root) if remote_is_complete(p)]
    if keep > 0:
        for _, old in complete[:-keep]:
            storage.unpublish(old, MARKER)
    return target


def restore_newest(root: RemotePath, local_checkpoint_dir: Path) -> Optional[Path]:
    """Download the newest complete remote checkpoint when this machine has nothing as new; returns the
    local directory it now lives in (None when nothing was needed or nothing exists)."""
    newest = newest_remote_complete(root)
    if newest is None:
        return None
    step = int(newest.name)
    local_final = local_checkpoint_dir / newest.name
    local_steps = [int(p.name) for p in local_checkpoint_dir.iterdir()
                   if p.is_dir() and p.name.isdigit() and (p / MARKER).is_file()] \
        if local_checkpoint_dir.is_dir() else []
    if local_steps and max(local_steps) >= step:
        return None
    tmp = local_checkpoint_dir / f".download-{newest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    storage.download_tree(newest, tmp)
    if local_final.exists():
        shutil.rmtree(local_final)
    os.replace(tmp, local_final)
    return local_final


# ---- per-rank save / restore (no shared disk) ------------------------------------------------------------
OPTIMIZER_PREFIX = "optimizer."


def begin_remote_save(step_dir: RemotePath) -> str:
    """Rank 0, before any rank uploads: withdraw whatever a previous attempt left at this step (marker
    first, so it never looks complete while being replaced). Returns a fresh id for this save."""
    storage.unpublish(step_dir, MARKER)
    return uuid.uuid4().hex[:12]


def upload_files(local_dir: Path, names: Iterable[str], step_dir: RemotePath) -> None:
    """Upload the named files (relative to local_dir) of one rank into the checkpoint prefix. Never the
    marker: only `seal_remote` writes it."""
    for name in names:
        if name == MARKER:
            raise ValueError("the marker is written by seal_remote, after every rank uploaded")
        storage.copy_file(local_dir / name, step_dir / name)


def seal_remote(step_dir: RemotePath, files: list[str], marker: dict) -> None:
    """Rank 0, after every rank's upload: check that every listed file is there, then write the marker LAST.
    Raises (no marker) when something is missing."""
    present = {rel for rel, _ in storage.files_under(step_dir)}
    missing = sorted(set(files) - present)
    if missing:
        raise RuntimeError(f"checkpoint {step_dir.display()} is missing {missing}; not marking it complete")
    data = json.dumps({**marker, "files": sorted(files)}, indent=2, sort_keys=True, default=str)
    storage.write_text_atomic(step_dir / MARKER, data)


def rotate_remote(root: RemotePath, keep: int) -> list[int]:
    """Keep the newest `keep` complete checkpoints; also drop incomplete ones older than the newest complete
    one (dead attempts: nothing writes them any more). Newer incomplete ones are never touched. Returns the
    steps removed."""
    steps = remote_steps(root)
    complete = [(s, p) for s, p in steps if remote_is_complete(p)]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [(s, p) for s, p in complete[:-keep]] if keep > 0 else []
    doomed += [(s, p) for s, p in steps if s < newest and (s, p) not in complete]
    for _, p in doomed:
        storage.unpublish(p, MARKER)
    return sorted(s for s, _ in doomed)


def choose_remote(root: RemotePath, restart_step: Optional[int], auto_resume: bool) -> Optional[tuple[int, str]]:
    """Rank 0: (step, reason) to resume from, or None. Ray Train's restart step wins when that checkpoint is
    complete on object storage; else (or when auto_resume) the newest complete one."""
    if restart_step is not None:
        target = root / f"{restart_step:07d}"
        if remote_is_complete(target):
            return restart_step, f"restart after failure (Ray Train's checkpoint {target.name}, from {target.display()})"
    if restart_step is not None or auto_resume:
        newest = newest_remote_complete(root)
        if newest is not None:
            return int(newest.name), f"auto_resume: newest complete checkpoint {newest.name} on {newest.display()}"
    return None


def _locked_download(src: RemotePath, dst: Path) -> None:
    """Download one object unless a rank on this node already did (per-file lock; rename into place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.with_name(f".{dst.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dst.is_file():
            return
        part = dst.with_name(f".{dst.name}.part-{os.getpid()}")
        storage.copy_file(src, part)
        os.replace(part, dst)


def restore_dir(local_checkpoint_dir: Path, step: int, save_id: str) -> Path:
    """The node-local folder a remote checkpoint is fetched into (named by step and save id, so a
    re-saved step never mixes with an older download)."""
    return local_checkpoint_dir / f".restore-{step:07d}-{save_id}"


def fetch_checkpoint(root: RemotePath, step: int, local_checkpoint_dir: Path) -> Path:
    """Every rank: download a complete remote checkpoint's files except the optimizer shards (fetched one by
    one with `fetch_file` once a rank knows its shard) into a node-local folder; returns that folder."""
    step_dir = root / f"{step:07d}"
    marker = _marker(step_dir)
    if not marker:
        raise RuntimeError(f"{step_dir.display()} has no {MARKER}; it is not a complete checkpoint")
    local = restore_dir(local_checkpoint_dir, step, str(marker.get("save_id", "legacy")))
    for rel, path in storage.files_under(step_dir):
        if rel.startswith(OPTIMIZER_PREFIX) or rel == MARKER:
            continue
        _locked_download(path, local / rel)
    _locked_download(step_dir / MARKER, local / MARKER)
    return local


def fetch_file(root: RemotePath, step: int, name: str, local: Path) -> bool:
    """Download one more file of a remote checkpoint (a rank's optimizer shard) into the fetched folder.
    False when the checkpoint has no such file."""
    src = root / f"{step:07d}" / name
    if not src.is_file():
        return False
    _locked_download(src, local / name)
    return True
