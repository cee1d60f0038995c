"""Checkpoints on object storage (`--storage_path s3://bucket/runs`), with no shared disk between nodes: the
same directory layout and marker rules as trainer/checkpoint/local.py, with each rank moving its own files.

Saving (`save_checkpoint_remote`: `begin_remote_save`, `upload_files`, `seal_remote`): every rank writes its
own files (its stream state, its optimizer shard under FSDP) into a node-local staging folder and uploads them
itself to `STORAGE/<run>/checkpoints/<step>/`; after a barrier rank 0 uploads the shared files (weights,
scheduler, train state, inference files), checks that every file the checkpoint needs is there, and writes
`COMPLETE.json` LAST. A remote checkpoint is complete only when its marker exists and every file the
marker lists is present; rotation (`rotate_remote`) counts and deletes complete ones only (marker first),
plus dead incomplete ones older than the newest complete one.

Resuming (`plan_remote`: `choose_remote`, `fetch_checkpoint`, `fetch_file`): rank 0 picks the step (the one
Ray Train restarts from, else the newest complete one) and broadcasts it; every rank downloads what it needs
(shared files, the stream states, later its own optimizer shard) into a node-local folder. Ranks that share a
node share the download (a per-file lock), so weights are fetched once per node. No rank reads another
node's disk.

`mirror_checkpoint` / `restore_newest` (whole-folder upload / download) remain for single-folder use.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import torch.distributed as dist

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath
from trainer.checkpoint import local as ck
from trainer.checkpoint.local import ADAPTER_FILE, MARKER, MODEL_FILE, step_dir_name
from trainer.parallel import barrier, broadcast_object

if TYPE_CHECKING:
    from trainer.config import TrainConfig

OPTIMIZER_PREFIX = "optimizer."


def remote_checkpoint_root(storage_path: Optional[str], run_name: str) -> Optional[RemotePath]:
    """STORAGE/<run>/checkpoints for a remote storage_path; None for a local one."""
    if not storage_path or not storage.is_remote(storage_path):
        return None
    return storage.as_path(storage_path) / run_name / "checkpoints"


# ---- discovery -------------------------------------------------------------------------------------------
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
    return all(name in present for name in marker.get("files", [])) and (MODEL_FILE in present
                                                                         or ADAPTER_FILE in present)


def remote_steps(root: RemotePath) -> list[tuple[int, RemotePath]]:
    """(step, prefix) of every all-digit sub-prefix, oldest first."""
    return sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit())


def newest_remote_complete(root: RemotePath) -> Optional[RemotePath]:
    for _, path in reversed(remote_steps(root)):
        if remote_is_complete(path):
            return path
    return None


# ---- whole folders ---------------------------------------------------------------------------------------
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


# ---- per-rank save (no shared disk) ----------------------------------------------------------------------
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


def save_checkpoint_remote(cfg: TrainConfig, remote: RemotePath, state: ck.TrainingState, step: int,
                           stream_state: Optional[dict], rank: int, world: int) -> Path:
    """Object storage, no shared disk: every rank stages its own files on its own disk and uploads them;
    after all uploads (a collective), rank 0 uploads the shared files, seals the checkpoint with
    COMPLETE.json last, rotates, and keeps its staged part as the local copy it reports to Ray Train."""
    is_main = rank == 0
    root = cfg.checkpoint_dir
    step_dir = remote / step_dir_name(step)
    save_id = _begin_everywhere(step_dir, step, is_main)
    model_state, ema_state = state.full_states()
    staging = ck.prepare_temp(root, step) if is_main else \
        _fresh_dir(root / f"{ck.TMP_PREFIX}{step_dir_name(step)}-rank{rank:05d}")
    err, own = None, []
    try:
        own = ck.write_rank_files(staging, state, stream_state, rank, world)
        upload_files(staging, own, step_dir)
    except Exception as exc:
        err = f"rank {rank} could not upload its files: {exc!r}"
    if not is_main:
        shutil.rmtree(staging, ignore_errors=True)
    _raise_if_any(err, f"checkpoint {step} not saved (no marker written)")   # all ranks' uploads done
    final = None
    if is_main:
        try:
            final = _seal_from_rank0(cfg, remote, state, model_state, ema_state, staging, own, step, world,
                                     save_id)
        except Exception as exc:
            err = f"rank 0 could not complete it: {exc!r}"
    _raise_if_any(err, f"checkpoint {step} not saved")
    return final if is_main else (root / step_dir_name(step))


def _begin_everywhere(step_dir: RemotePath, step: int, is_main: bool) -> Optional[str]:
    """Rank 0 withdraws an old attempt at this step (a restart re-saving it) before anyone uploads; every
    rank gets the save id, or raises together with the others."""
    begun: tuple[Optional[str], Optional[str]] = (None, None)
    if is_main:
        try:
            begun = (begin_remote_save(step_dir), None)
        except Exception as exc:
            begun = (None, f"rank 0 could not prepare {step_dir.display()}: {exc!r}")
    save_id, err = broadcast_object(begun)
    if err:
        raise RuntimeError(f"checkpoint {step} not saved: {err}")
    return save_id


def _seal_from_rank0(cfg: TrainConfig, remote: RemotePath, state: ck.TrainingState, model_state, ema_state,
                     staging: Path, own: list[str], step: int, world: int, save_id: Optional[str]) -> Path:
    """Rank 0, after every rank's upload: the shared files up, the marker last, rotation (remote, then the
    local copies, which count when they carry a marker); returns the local copy of rank 0's part."""
    step_dir = remote / step_dir_name(step)
    files = ck.per_rank_files(state.par, world)
    shared = ck.write_shared_files(staging, cfg, state, model_state, ema_state, step, world)
    upload_files(staging, [f for f in _staged_names(staging) if f not in own], step_dir)
    files += shared
    marker = {"step": step, "world_size": world, "save_id": save_id}
    seal_remote(step_dir, files, marker)               # COMPLETE.json last
    rotate_remote(remote, cfg.train.max_checkpoints)
    root = cfg.checkpoint_dir
    final = ck.finalize(root, step, files, {**marker, "remote": step_dir.display()}, present=own + shared)
    ck.rotate(root, cfg.train.max_checkpoints, complete=lambda p: ck.read_marker(p) is not None)
    return final


def _raise_if_any(err: Optional[str], what: str) -> None:
    """A collective: every rank learns whether any rank failed, and all raise together (nobody is left
    waiting in a barrier for a rank that died)."""
    errs = [err]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    errs = [e for e in errs if e]
    if errs:
        raise RuntimeError(f"{what}: " + "; ".join(errs))


def _staged_names(folder: Path) -> list[str]:
    """Relative names of every file under a staging folder (inference files live in sub-folders)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- per-rank restore ------------------------------------------------------------------------------------
def choose_remote(root: RemotePath, restart_step: Optional[int], auto_resume: bool) -> Optional[tuple[int, str]]:
    """Rank 0: (step, reason) to resume from, or None. Ray Train's restart step wins when that checkpoint is
    complete on object storage; else (or when auto_resume) the newest complete one."""
    if restart_step is not None:
        target = root / step_dir_name(restart_step)
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
    return local_checkpoint_dir / f".restore-{step_dir_name(step)}-{save_id}"


def fetch_checkpoint(root: RemotePath, step: int, local_checkpoint_dir: Path) -> Path:
    """Every rank: download a complete remote checkpoint's files except the optimizer shards (fetched one by
    one with `fetch_file` once a rank knows its shard) into a node-local folder; returns that folder."""
    step_dir = root / step_dir_name(step)
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
    src = root / step_dir_name(step) / name
    if not src.is_file():
        return False
    _locked_download(src, local / name)
    return True


@dataclass
class FetchedCheckpoint:
    """A remote checkpoint this rank resumes from, fetched into a node-local folder."""
    root: RemotePath
    step: int
    local: Path

    @property
    def uri(self) -> str:
        return (self.root / step_dir_name(self.step)).display()

    def fetch(self, name: str) -> bool:
        """One more file of it (this rank's optimizer shard), once the rank knows which."""
        return fetch_file(self.root, self.step, name, self.local)

    def release(self) -> None:
        """Every rank, once everything is in memory: drop the node-local download (after a barrier, since
        ranks on one node share it)."""
        barrier()
        shutil.rmtree(self.local, ignore_errors=True)


def plan_remote(cfg: TrainConfig, remote: RemotePath, ray_checkpoint: Optional[Path], is_main: bool
                ) -> tuple[ck.ResumePlan, Optional[FetchedCheckpoint]]:
    """Rank 0 picks the remote checkpoint (Ray Train's restart step, else the newest complete one) and
    broadcasts it, so every rank resumes the same step; each rank fetches the files it needs onto its own
    disk. Without a remote checkpoint: resume_from / model_path / random init, as on local storage."""
    t = cfg.train
    choice = None
    if is_main:
        try:
            picked = choose_remote(remote, _checkpoint_step(ray_checkpoint), t.auto_resume)
            choice = (picked, ray_checkpoint is not None, None)
        except Exception as exc:
            choice = (None, False, f"cannot list {remote.display()}: {exc!r}")
    picked, restart, err = broadcast_object(choice)
    if err:
        raise ck.ResumeError(err)
    if picked is None:
        return ck.plan_resume_for(cfg, auto_resume=False), None
    step, reason = picked
    local, ferr = None, None
    try:
        local = fetch_checkpoint(remote, step, cfg.checkpoint_dir)
    except Exception as exc:
        ferr = f"{exc!r}"
    _raise_if_any(ferr, f"cannot fetch checkpoint {step} from {remote.display()}")
    plan = ck.plan_fetched(local, reason, restart=restart, resume_model_only=t.resume_model_only,
                           resume_model_optimizer=t.resume_model_optimizer)
    return plan, FetchedCheckpoint(remote, step, local)


def _checkpoint_step(path: Optional[Path]) -> Optional[int]:
    """The step of the checkpoint Ray Train restarts from (its folder is named after it; the folder itself
    may be on another node's disk)."""
    if path is None:
        return None
    if path.name.isdigit():
        return int(path.name)
    marker = ck.read_marker(path)
    return int(marker["step"]) if marker and "step" in marker else None
