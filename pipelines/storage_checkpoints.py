"""Checkpoints on object storage (`--storage_path s3://bucket/runs`): a marker-last mirror of the trainer's
complete checkpoints, and a restore of the newest complete one before resuming.

The trainer keeps writing each checkpoint the way it does on disk (temp dir, every rank's files, then
`COMPLETE.json`, then a rename; see trainer/checkpointing.py) into a local run directory. Once a checkpoint
is complete there, rank 0 uploads it to `STORAGE/<run>/checkpoints/<step>/` with `COMPLETE.json` LAST
(`storage.upload_tree`), then rotates the remote copies (marker first, so a half-deleted checkpoint never
looks complete). On start-up, when the newest complete remote checkpoint is newer than anything local (a
fresh node, a new cluster), it is downloaded into the local checkpoint folder (into a temp dir, renamed
into place), so `auto_resume` picks it up with no other change. A remote checkpoint is complete only when
its marker exists and every file the marker lists is present.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from . import storage
from .storage import RemotePath

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
