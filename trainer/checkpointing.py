"""Checkpoint directories in the UniMedVL layout (bagel-compat §1.7), written atomically.

`checkpoint_dir/{step:07d}/` holds model.safetensors, ema.safetensors, optimizer.{i:05d}-of-{N:05d}.pt,
scheduler.pt, stream_state.{rank:05d}-of-{W:05d}.json (the exact data-stream state of each rank, replacing
upstream's data_status.pt), train_state.json, training_args.json, the inference files (llm/vit configs,
tokenizer) and finally `COMPLETE.json`. Everything is written into `.tmp-{step:07d}/` first, the marker
last, then the directory is renamed: a crash mid-save never leaves a directory that looks complete.

With `--storage_path s3://...` object storage is the checkpoint store and no disk is shared: each rank stages
and uploads its own files (pipelines/storage/checkpoints.py), and the local folder on rank 0's node is a copy
of rank 0's part (its marker lists the whole checkpoint, so with several ranks it is not complete locally).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

MARKER = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
SCHEDULER_FILE = "scheduler.pt"
TRAIN_STATE_FILE = "train_state.json"
TRAINING_ARGS_FILE = "training_args.json"
TMP_PREFIX = ".tmp-"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{step:07d}"


def optimizer_file(index: int, count: int) -> str:
    return f"optimizer.{index:05d}-of-{count:05d}.pt"


def stream_state_file(rank: int, world: int) -> str:
    return f"stream_state.{rank:05d}-of-{world:05d}.json"


# ---- discovery ---------------------------------------------------------------------------------------
def numeric_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every all-digit subdirectory, oldest first; tensorboard/, .tmp-* etc. are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    out = [(int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(out)


def read_marker(path: str | Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: str | Path) -> bool:
    """The marker exists and every file it lists is present (model, EMA, scheduler, all optimizer shards,
    every rank's stream state)."""
    marker = read_marker(path)
    if not marker:
        return False
    path = Path(path)
    return all((path / name).is_file() for name in marker.get("files", [])) and (path / MODEL_FILE).is_file()


def newest_complete(checkpoint_dir: str | Path) -> Optional[Path]:
    for _, path in reversed(numeric_checkpoints(checkpoint_dir)):
        if is_complete(path):
            return path
    return None


def rotate(checkpoint_dir: str | Path, keep: int,
           complete: Callable[[Path], bool] = is_complete) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, plus incomplete dirs older than the newest
    complete one and stale temp dirs. Returns what was removed. `complete` decides what counts (the local
    copies of an object-storage run count when they carry a marker)."""
    root = Path(checkpoint_dir)
    removed: list[Path] = []
    ckpts = numeric_checkpoints(root)
    done = [(s, p) for s, p in ckpts if complete(p)]
    done_paths = {p for _, p in done}   # `complete` reads and checks a marker: once per checkpoint
    newest = done[-1][0] if done else None
    doomed = [p for _, p in done[:-keep]] if keep > 0 else []
    doomed += [p for s, p in ckpts if newest is not None and s < newest and p not in done_paths]
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---- writing -----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: Path, obj: Any) -> None:
    from pipelines.storage.uris import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def temp_dir(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"{TMP_PREFIX}{step_dir_name(step)}"


def prepare_temp(checkpoint_dir: str | Path, step: int) -> Path:
    """Rank 0: a fresh, empty temp directory for this step."""
    tmp = temp_dir(checkpoint_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finalize(checkpoint_dir: str | Path, step: int, files: list[str], extra: Optional[dict] = None,
             present: Optional[list[str]] = None) -> Path:
    """Rank 0, after every rank wrote its files: check them, write the marker, rename into place.
    `present` (default: all of `files`) is what must be in the temp dir: on object storage only rank 0's
    own files are on this disk, the rest went to the bucket from the other ranks."""
    tmp = temp_dir(checkpoint_dir, step)
    missing = [f for f in (files if present is None else present) if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {tmp} is missing {missing}; not marking it complete")
    write_json(tmp / MARKER, {"step": step, "files": sorted(files), **(extra or {})})
    _fsync_dir(tmp)
    final = Path(checkpoint_dir) / step_dir_name(step)
    if final.exists():  # a restarted run re-saving the same step: swap, never leave a gap
        old = Path(checkpoint_dir) / f"{TMP_PREFIX}old-{step_dir_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(Path(checkpoint_dir))
    return final


def save_state_file(obj: Any, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    torch.save(obj, part)
    os.replace(part, path)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    part = path.with_name(path.name + ".part")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(part), metadata=metadata or {"format": "pt"})
    os.replace(part, path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- resume plan -------------------------------------------------------------------------------------
@dataclass
class ResumePlan:
    """What to load at start-up and from where (bagel-compat §1.3, minus its pitfalls)."""
    source: Optional[Path] = None       # directory with weights (None = random init)
    weights_file: str = MODEL_FILE      # model.safetensors or ema.safetensors
    ema_file: str = EMA_FILE            # the EMA copy starts from ema.safetensors, falling back to model
    load_train_state: bool = False      # optimizer, scheduler, step, stream state
    load_optimizer: bool = True
    reason: str = "random init"
    notes: list[str] = field(default_factory=list)


def plan_resume(*, checkpoint_dir: Path, auto_resume: bool, resume_from: Optional[str], model_path: Optional[str],
                finetune_from_ema: bool, resume_model_only: bool, resume_model_optimizer: bool,
                ray_checkpoint: Optional[Path] = None) -> ResumePlan:
    """Decide the start-up source. Order: the checkpoint Ray Train restarts us from (same run, after a
    worker failure); the newest complete checkpoint in checkpoint_dir when auto_resume; resume_from; the
    model_path weights (fine-tuning: upstream left the model at random init here); else random init."""
    if ray_checkpoint is not None and is_complete(ray_checkpoint):
        return ResumePlan(ray_checkpoint, MODEL_FILE, EMA_FILE, True, True,
                          "restart after failure (Ray Train's latest checkpoint of this run)")
    if auto_resume:
        newest = newest_complete(checkpoint_dir)
        if newest is not None:
            return ResumePlan(newest, MODEL_FILE, EMA_FILE, not resume_model_only, resume_model_optimizer,
                              f"auto_resume: newest complete checkpoint {newest.name}")
    if resume_from:
        src = Path(resume_from)
        if not src.is_dir():
            raise ResumeError(f"resume_from {src} is not a directory")
        weights = EMA_FILE if finetune_from_ema else MODEL_FILE
        if not (src / weights).is_file():
            hint = (" (pass --finetune_from_ema True to start from ema.safetensors)"
                    if weights == MODEL_FILE and (src / EMA_FILE).is_file() else "")
            raise ResumeError(f"resume_from {src} has no {weights}{hint}")
        full = not resume_model_only and not finetune_from_ema and is_complete(src)
        notes = [] if full or resume_model_only or finetune_from_ema else [
            f"{src} is not a complete training checkpoint: loading weights only (fresh optimizer, step 0)"]
        return ResumePlan(src, weights, EMA_FILE, full, resume_model_optimizer,
                          f"resume_from {src} ({'full resume' if full else 'weights only'}, {weights})", notes)
    if model_path:
        src = Path(model_path)
        weights = EMA_FILE if finetune_from_ema else MODEL_FILE
        if not (src / weights).is_file():
            other = MODEL_FILE if weights == EMA_FILE else EMA_FILE
            hint = f"; it has {other}: pass --finetune_from_ema {weights == MODEL_FILE}" if (src / other).is_file() else ""
            raise ResumeError(f"model_path {src} has no {weights}{hint}")
        return ResumePlan(src, weights, EMA_FILE, False, False, f"fine-tune from {src}/{weights}")
    return ResumePlan(None, reason="random init (--from_scratch)")


def plan_resume_for(cfg: Any, *, auto_resume: Optional[bool] = None,
                    ray_checkpoint: Optional[Path] = None) -> ResumePlan:
    """`plan_resume` with the settings of a `trainer.config.TrainConfig` (`auto_resume` overrides its own)."""
    t = cfg.train
    return plan_resume(checkpoint_dir=cfg.checkpoint_dir,
                       auto_resume=t.auto_resume if auto_resume is None else auto_resume,
                       resume_from=t.resume_from, model_path=cfg.model.model_path,
                       finetune_from_ema=t.finetune_from_ema, resume_model_only=t.resume_model_only,
                       resume_model_optimizer=t.resume_model_optimizer, ray_checkpoint=ray_checkpoint)


def plan_fetched(source: Path, reason: str, *, restart: bool, resume_model_only: bool,
                 resume_model_optimizer: bool) -> ResumePlan:
    """The plan for a checkpoint fetched from object storage (chosen by rank 0, same on every rank)."""
    if restart:
        return ResumePlan(source, MODEL_FILE, EMA_FILE, True, True, reason)
    return ResumePlan(source, MODEL_FILE, EMA_FILE, not resume_model_only, resume_model_optimizer, reason)


def read_train_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAIN_STATE_FILE).read_text())
    except (OSError, ValueError):
        if path.name.isdigit():
            return {"step": int(path.name)}
        return {"step": 0}


def load_stream_state(path: Path, rank: int, world: int) -> Optional[dict]:
    f = path / stream_state_file(rank, world)
    if f.is_file():
        return json.loads(f.read_text())
    others = sorted(p.name for p in path.glob("stream_state.*.json"))
    if others:
        raise ResumeError(f"{path} was saved with a different number of workers ({others[0]}); resume with the "
                          f"same --num_workers ({world} now), or pass --resume_model_only True")
    return None
