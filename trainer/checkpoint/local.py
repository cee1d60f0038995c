"""Checkpoint directories in the UniMedVL layout, written atomically, and the save / restore of a training
state through them.

`checkpoint_dir/{step:07d}/` holds model.safetensors, ema.safetensors, optimizer.{i:05d}-of-{N:05d}.pt,
scheduler.pt, stream_state.{rank:05d}-of-{W:05d}.json (the exact data-stream state of each rank, replacing
upstream's data_status.pt), train_state.json, training_args.json, the inference files (llm/vit configs,
tokenizer) and finally `COMPLETE.json`. Everything is written into `.tmp-{step:07d}/` first, the marker
last, then the directory is renamed: a crash mid-save never leaves a directory that looks complete. The
`.pt` files hold tensors and plain values only and are read back with `torch.load(weights_only=True)`: a
checkpoint is data, never code (trainer/checkpoint/state_files.py).

With `--storage_path s3://...` object storage is the checkpoint store and no disk is shared: each rank stages
and uploads its own files (trainer/checkpoint/remote.py), and the local folder on rank 0's node is a copy
of rank 0's part (its marker lists the whole checkpoint, so with several ranks it is not complete locally).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from trainer.checkpoint.state_files import ResumeError, check_plain, check_weights_file, load_state_file
from trainer.parallel import Parallel, barrier, full_state_dict, load_optimizer_state, optimizer_state_for_save

if TYPE_CHECKING:
    from trainer.config import TrainConfig

MARKER = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
SCHEDULER_FILE = "scheduler.pt"
TRAIN_STATE_FILE = "train_state.json"
TRAINING_ARGS_FILE = "training_args.json"
TMP_PREFIX = ".tmp-"
ADAPTER_FILE = "adapter_model.safetensors"   # a LoRA checkpoint's weights (model/adapters.py)


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
    return all((path / name).is_file() for name in marker.get("files", [])) and (
        (path / MODEL_FILE).is_file() or (path / ADAPTER_FILE).is_file())


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
    """An optimizer / scheduler state as a .pt file that `torch.load(weights_only=True)` restores (checked
    before writing: trainer/checkpoint/state_files.py), written elsewhere then renamed."""
    check_plain(obj, path.name)
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
    """What to load at start-up and from where (docs/upstream-compat.md#resume, minus its pitfalls)."""
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


def check_resume_files(plan: ResumePlan) -> None:
    """Before any worker starts: the weights files open, and every optimizer / scheduler file a full resume
    would read loads as data (memory-mapped, so a large optimizer costs little); the first that does not is a
    `ResumeError` naming it."""
    if plan.source is None:
        return
    for name in dict.fromkeys((plan.weights_file, plan.ema_file)):
        if (plan.source / name).is_file() and name.endswith(".safetensors"):
            check_weights_file(plan.source / name)
    if not (plan.load_train_state and plan.load_optimizer):
        return
    names = sorted(p for p in plan.source.glob("optimizer.*-of-*.pt") if p.is_file())
    names += [plan.source / SCHEDULER_FILE] if (plan.source / SCHEDULER_FILE).is_file() else []
    for path in names:
        load_state_file(path, mmap=True)


def plan_resume_for(cfg: TrainConfig, *, auto_resume: Optional[bool] = None,
                    ray_checkpoint: Optional[Path] = None) -> ResumePlan:
    """`plan_resume` with the settings of a `trainer.config.TrainConfig` (`auto_resume` overrides its own),
    its weights, optimizer and scheduler files checked to load as data (`check_resume_files`)."""
    t = cfg.train
    plan = plan_resume(checkpoint_dir=cfg.checkpoint_dir,
                       auto_resume=t.auto_resume if auto_resume is None else auto_resume,
                       resume_from=t.resume_from, model_path=cfg.model.model_path,
                       finetune_from_ema=t.finetune_from_ema, resume_model_only=t.resume_model_only,
                       resume_model_optimizer=t.resume_model_optimizer, ray_checkpoint=ray_checkpoint)
    check_resume_files(plan)   # jobs/train.py calls this on the driver: a bad file is refused before Ray starts
    return plan


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


def load_stream_state(path: Path, rank: int, world: int, slots: Optional[int] = None) -> Optional[dict]:
    """This rank's saved data-stream state; after a change of world size or (given `slots`) of loader
    workers, the merge of every old stream's state (trainer/checkpoint/reshard.py)."""
    from trainer.checkpoint import reshard

    f = path / stream_state_file(rank, world)
    saved = reshard.saved_topology(path)
    if f.is_file() and (slots is None or saved is None or saved[1] == slots):
        return json.loads(f.read_text())
    if saved is None:
        return None
    if slots is None:
        raise ResumeError(f"{path} was saved with {saved[0]} worker(s); resume with the same --num_workers "
                          f"({world} now), or pass --resume_model_only True")
    try:
        return reshard.merged_loader_state(path, slots)
    except reshard.TopologyError as exc:
        raise ResumeError(str(exc)) from None


def load_weights_checked(model, source: Path, filename: str, *, strict: bool, log: Callable[[str], None]) -> None:
    """Load weights; never let a wrong directory silently leave the model at random init."""
    from trainer.model_setup import load_weights_into

    check_weights_file(source / filename)
    missing, unexpected, loaded = load_weights_into(model, source, filename)
    if loaded == 0:
        raise ResumeError(f"{source / filename}: no tensor matches the model (unexpected keys e.g. "
                          f"{unexpected[:3]}); is this a checkpoint of this architecture?")
    if missing and strict:
        raise ResumeError(f"{source / filename} lacks {len(missing)} tensors of the model (e.g. {missing[:3]}); "
                          f"a training checkpoint must resume completely")
    if missing:
        log(f"note: {len(missing)} tensors not in {filename} keep their init, e.g. {missing[:3]}")
    if unexpected:
        log(f"warning: {len(unexpected)} unexpected keys in {filename} ignored, e.g. {unexpected[:3]}")


# ---- a training state: what a checkpoint saves and a full resume restores --------------------------------
@dataclass
class TrainingState:
    """Everything a checkpoint saves besides each rank's data-stream state."""
    par: Parallel                   # the wrapped model (DDP or FSDP2) and its sharding of the optimizer
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model_config: Any               # written as the inference files (llm/vit configs)
    tokenizer: Any
    adapter: Any = None             # trainer.adapters.LoraRun: the checkpoint holds adapters, not full weights
    inference: Optional[dict] = None   # training_args.json's "inference" record (trainer/checkpoint/inference_record.py)

    def full_states(self) -> tuple[Optional[dict], Optional[dict]]:
        """Full model and EMA state dicts (collectives under FSDP: every rank calls; rank 0 gets them)."""
        if self.adapter is not None:
            from trainer.parallel import rank_and_world

            return self.adapter.full_states(self.par.model, self.ema, rank_and_world()[0])
        return full_state_dict(self.par.model, self.par.kind), full_state_dict(self.ema, self.par.kind)


def restore_train_state(source: Path, state: TrainingState, *, load_optimizer: bool, rank: int, world: int,
                        fetch: Optional[Callable[[str], Any]] = None,
                        slots: Optional[int] = None) -> tuple[int, Optional[dict]]:
    """A full resume from `source`: returns (completed steps, this rank's stream state) after loading this
    rank's optimizer shard and the LR schedule (or, without the optimizer, only the schedule's step).
    `fetch(name)` downloads a file of this rank that is not on disk yet (object storage: its optimizer shard)."""
    step = int(read_train_state(source).get("step", 0))
    if load_optimizer:
        _load_optimizer(source, state, fetch)
    else:
        state.scheduler.load_state_dict({"last_step": step})
    return step, load_stream_state(source, rank, world, slots)


def _load_optimizer(source: Path, state: TrainingState, fetch: Optional[Callable[[str], Any]]) -> None:
    idx, count = state.par.optimizer_load_shard
    f = source / optimizer_file(idx, count)
    if fetch is not None and not f.is_file():   # this rank's shard only, fetched by this rank
        fetch(f.name)
    if f.is_file():
        saved = load_state_file(f)
    else:   # saved with another FSDP shard count: rebuild this rank's shard from all old ones
        from trainer.checkpoint.reshard import load_resharded_optimizer

        saved = load_resharded_optimizer(source, idx, count, fetch)
        if saved is None:
            raise ResumeError(f"{source} has no {f.name} for this rank and no complete set of optimizer shards "
                              f"to rebuild it from; pass --resume_model_optimizer False to start a fresh "
                              f"optimizer, or --resume_model_only True")
    load_optimizer_state(state.optimizer, saved)
    sched_file = source / SCHEDULER_FILE
    if sched_file.is_file():
        state.scheduler.load_state_dict(load_state_file(sched_file))


def save_checkpoint(cfg: TrainConfig, state: TrainingState, step: int, stream_state: Optional[dict], rank: int,
                    world: int) -> Path:
    """Every rank writes its own files into the temp dir; rank 0 the full weights; then rank 0 marks the
    directory complete and renames it into place (`finalize`). Needs a disk all ranks share."""
    is_main = rank == 0
    root = cfg.checkpoint_dir
    if is_main:
        prepare_temp(root, step)
    barrier()
    tmp = temp_dir(root, step)
    model_state, ema_state = state.full_states()
    write_rank_files(tmp, state, stream_state, rank, world)
    files = per_rank_files(state.par, world)
    if is_main:
        files += write_shared_files(tmp, cfg, state, model_state, ema_state, step, world)
    barrier()
    final = None
    if is_main:
        final = finalize(root, step, files, {"world_size": world})
        rotate(root, cfg.train.max_checkpoints)
    barrier()
    return final if is_main else (root / step_dir_name(step))


def write_rank_files(folder: Path, state: TrainingState, stream_state: Optional[dict], rank: int,
                     world: int) -> list[str]:
    """This rank's own files: its optimizer shard (if it writes one) and its stream state."""
    own = []
    if state.par.optimizer_shard is not None:
        idx, count = state.par.optimizer_shard
        save_state_file(optimizer_state_for_save(state.optimizer), folder / optimizer_file(idx, count))
        own.append(optimizer_file(idx, count))
    write_json(folder / stream_state_file(rank, world), stream_state)
    own.append(stream_state_file(rank, world))
    return own


def per_rank_files(par: Parallel, world: int) -> list[str]:
    """Every rank's files a complete checkpoint holds (stream states, optimizer shards)."""
    files = [stream_state_file(i, world) for i in range(world)]
    if par.kind == "fsdp":
        shard_count = par.optimizer_shard[1] if par.optimizer_shard else par.optimizer_load_shard[1]
        files += [optimizer_file(i, shard_count) for i in range(shard_count)]
    else:
        files.append(optimizer_file(0, 1))
    return files


def write_shared_files(folder: Path, cfg: TrainConfig, state: TrainingState, model_state, ema_state, step: int,
                       world: int) -> list[str]:
    """Rank 0: full weights and EMA (or a LoRA run's adapter files), scheduler, train state, inference files.
    Returns the marker-listed names."""
    from model.checkpoint import write_inference_files

    files = []
    if state.adapter is not None:   # LoRA: adapters in PEFT's format and the base reference, no full weights
        files += state.adapter.write(folder, model_state, ema_state)
    else:
        files += _write_full_weights(folder, cfg, model_state, ema_state)
    save_state_file(state.scheduler.state_dict(), folder / SCHEDULER_FILE)
    write_json(folder / TRAIN_STATE_FILE, {"step": step, "world_size": world, "train_steps": step})
    args = {**cfg.flat(), **({"inference": state.inference} if state.inference else {})}
    write_inference_files(folder, state.model_config, state.tokenizer, training_args=args)
    files += [SCHEDULER_FILE, TRAIN_STATE_FILE, TRAINING_ARGS_FILE]
    return files


def _write_full_weights(folder: Path, cfg: TrainConfig, model_state, ema_state) -> list[str]:
    from model.checkpoint import VAE_FILES, save_weights
    from trainer.model_setup import split_vae

    files = []
    model_main, vae_state = split_vae(model_state, cfg.train.freeze_vae)
    ema_main, _ = split_vae(ema_state, cfg.train.freeze_vae)
    save_weights(model_main, folder / MODEL_FILE)
    save_weights(ema_main, folder / EMA_FILE)
    if vae_state is not None:  # frozen VAE: ae.safetensors (FLUX names), as checkpoints are loaded
        save_weights(vae_state, folder / VAE_FILES[0])
        files.append(VAE_FILES[0])
    return files + [MODEL_FILE, EMA_FILE]
