"""The per-worker training loop (bagel-compat §1.2, §1.5): runs inside each Ray Train worker, or directly
in-process (world size 1, no process group) for tests and debugging.

Steps are counted as *completed* optimizer steps: checkpoint `0000030/` holds the state after 30 steps,
and a run resumed from it starts its 31st step (upstream names a directory after the 0-based index of its
last step instead).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pipelines.storage import checkpoints as sc
from pipelines.storage.checkpoints import remote_checkpoint_root
from trainer import checkpointing as ck
from trainer.config import TrainConfig, training_args_json
from trainer.data import LoaderState
from trainer.ema import ema_update, make_ema
from trainer.loss import all_reduce_sum, compute_loss, global_denominators
from trainer.metrics import MetricsSink, Window, peak_tflops_from_name, summarise
from trainer.optim import build_optimizer
from trainer.parallel import (Parallel, barrier, broadcast_object, clip_grad_norm, full_state_dict,
                              load_optimizer_state, optimizer_state_for_save, rank_and_world, wrap_ddp,
                              wrap_ema_fsdp, wrap_fsdp)
from trainer.prefetch import Prefetcher
from trainer.schedule import WarmupScheduler


class Reporter(Protocol):
    def report(self, metrics: dict, checkpoint_dir: Optional[Path]) -> None: ...


class InjectedFailure(RuntimeError):
    """Raised once by --inject_failure_at_step to exercise Ray Train's restart path."""


@dataclass
class LoopResult:
    start_step: int
    final_step: int
    history: list[dict] = field(default_factory=list)     # per step: step, ce, mse, loss (global means)
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: Optional[str] = None
    data_wait_fraction: float = 0.0


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(global_seed: int, rank: int, step: int, micro: int, salt: str) -> int:
    """Noise seeds are a pure function of (seed, rank, step, micro-step), so a resumed run draws exactly what
    the uninterrupted run drew, with no RNG state to save."""
    return zlib.crc32(f"{salt}:{global_seed}:{rank}:{step}:{micro}".encode()) & 0x7FFFFFFF


def _noise(batch, channels: int, seed: int, device: torch.device) -> Optional[torch.Tensor]:
    idx = batch.packed_vae_token_indexes
    if idx is None or idx.numel() == 0:
        return None
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(idx.numel(), channels, generator=g, device=device)


def _maybe_fail(cfg: TrainConfig, rank: int, step: int) -> None:
    r = cfg.run
    if r.inject_failure_at_step is None or step != r.inject_failure_at_step or rank != r.inject_failure_rank:
        return
    marker = cfg.results_dir / f".injected_failure_step{step}_rank{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    raise InjectedFailure(f"injected failure on rank {rank} after step {step} (--inject_failure_at_step)")


def train_loop(cfg: TrainConfig | dict, *, reporter: Optional[Reporter] = None,
               ray_checkpoint: Optional[Path] = None,
               batch_factory: Optional[Callable[[Optional[dict], int, int], Callable[[int, int], Iterator]]] = None,
               model_builder: Optional[Callable[[TrainConfig], Any]] = None,
               groups: Optional[list[str]] = None, print_fn: Callable[[str], None] = print) -> LoopResult:
    """Train until total_steps (or stop_at_step). `batch_factory(state, rank, world)` and `model_builder(cfg)`
    replace the mixture stream and the model in unit tests; by default they come from the config."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    t, r = cfg.train, cfg.run
    rank, world = rank_and_world()
    is_main = rank == 0
    log = (lambda msg: print_fn(f"[train] {msg}")) if is_main else (lambda msg: None)

    # -- devices, seeds, determinism (§1.2 step 1) --------------------------------------------------
    use_cuda = r.use_gpu and torch.cuda.is_available()
    if r.use_gpu and not use_cuda:
        raise RuntimeError("--use_gpu True but this worker sees no CUDA device")
    device = _cuda_device() if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(r.torch_threads or 1)
    elif r.torch_threads:
        torch.set_num_threads(r.torch_threads)
    _seed_all(t.global_seed * world + rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    # -- model, EMA, weights (§1.2 steps 2-9, §1.3) --------------------------------------------------
    if model_builder is None:
        from trainer.model_setup import build_model

        built = build_model(cfg)
        model, mc, tokenizer = built.model, built.config, built.tokenizer
    else:
        model, mc, tokenizer = model_builder(cfg)
    from trainer.model_setup import apply_freeze_flags, packing_config

    remote_ckpts = remote_checkpoint_root(r.storage_path, cfg.run_name)   # --storage_path s3://...
    fetched: Optional[tuple[int, str]] = None   # (step, URI) of a checkpoint fetched from object storage
    if remote_ckpts is not None:
        # object storage is the checkpoint store: rank 0 picks the step, every rank fetches its own files
        plan, fetched = _plan_remote(cfg, remote_ckpts, ray_checkpoint, is_main)
    else:
        plan = ck.plan_resume_for(cfg, ray_checkpoint=ray_checkpoint)
    log(f"start: {plan.reason}")
    for note in plan.notes:
        log(f"note: {note}")
    if plan.source is not None:
        _load_checked(model, plan.source, plan.weights_file, strict=plan.load_train_state, log=log)
    if cfg.model.vae_path and not plan.load_train_state and getattr(model, "vae_model", None) is not None:
        from model.checkpoint import load_vae_weights

        load_vae_weights(model.vae_model, cfg.model.vae_path, strict=True)   # FLUX AE (ae.safetensors)
        log(f"VAE weights from {cfg.model.vae_path}")
    apply_freeze_flags(model, cfg)
    ema = make_ema(model)
    if plan.source is not None:
        # the EMA starts from the source's EMA weights when it has them, else from the weights just loaded
        ema_file = plan.ema_file if (plan.source / plan.ema_file).is_file() else plan.weights_file
        _load_checked(ema, plan.source, ema_file, strict=plan.load_train_state, log=log)
    model.train()
    ema.train()  # upstream keeps the EMA in train mode (its layers dispatch on .training)

    use_fsdp = r.parallelism == "fsdp" or (r.parallelism == "auto" and use_cuda)
    own_group = False
    if use_fsdp:
        # no model.to(device) here: fully_shard moves one unit at a time to the mesh's device and keeps only
        # its shard, so the full fp32 model (and EMA: ~58 GB each at 7B) never sits on one GPU
        if not dist.is_initialized():   # FSDP2 needs a process group, even for one rank
            _single_process_group("nccl" if use_cuda else "gloo")
            own_group = True
        par: Parallel = wrap_fsdp(model, freeze_vae=t.freeze_vae, sharding_strategy=t.sharding_strategy,
                                  num_replicate=t.num_replicate, num_shard=t.num_shard, cpu_offload=t.cpu_offload,
                                  activation_checkpointing=t.activation_checkpointing and use_cuda,
                                  reshard_after_forward=t.sharding_strategy != "NO_SHARD",
                                  device_type=device.type, param_dtype=torch.bfloat16 if use_cuda else None)
        wrap_ema_fsdp(ema, par.mesh, cpu_offload=t.cpu_offload)   # shards on the same device as the model's
    else:
        model.to(device)
        ema.to(device)
        par = wrap_ddp(model, freeze_vae=t.freeze_vae)

    optimizer = build_optimizer(model, lr=t.lr, beta1=t.beta1, beta2=t.beta2, eps=t.eps, llm_lr=t.llm_lr,
                                vit_lr=t.vit_lr, vae_lr=t.vae_lr)
    scheduler = WarmupScheduler(optimizer, kind=t.lr_scheduler, warmup_steps=t.warmup_steps,
                                total_steps=t.total_steps, lr=t.lr, min_lr=t.min_lr)

    # -- train state (§1.2 step 12) --------------------------------------------------------------------
    start_step, stream_state = 0, None
    if plan.load_train_state and plan.source is not None:
        start_step = int(ck.read_train_state(plan.source).get("step", 0))
        if plan.load_optimizer:
            idx, count = par.optimizer_load_shard
            f = plan.source / ck.optimizer_file(idx, count)
            if fetched is not None and not f.is_file():   # this rank's shard only, fetched by this rank
                sc.fetch_file(remote_ckpts, fetched[0], f.name, plan.source)
            if f.is_file():
                load_optimizer_state(optimizer, torch.load(f, map_location="cpu", weights_only=False))
                sched_file = plan.source / ck.SCHEDULER_FILE
                if sched_file.is_file():
                    scheduler.load_state_dict(torch.load(sched_file, map_location="cpu", weights_only=False))
            else:
                raise ck.ResumeError(f"{plan.source} has no {f.name} for this rank (saved with another "
                                     f"world size or sharding); resume with the same --num_workers")
        else:
            scheduler.load_state_dict({"last_step": start_step})
        stream_state = ck.load_stream_state(plan.source, rank, world)
        log(f"resumed train state at step {start_step}")
    if fetched is not None:   # everything is in memory now: drop the node-local download
        barrier()
        import shutil

        shutil.rmtree(plan.source, ignore_errors=True)

    # -- data ---------------------------------------------------------------------------------------
    slots = max(1, cfg.data.dataloader_workers)
    try:
        loader_state = LoaderState.from_json(stream_state, slots)
    except ValueError as exc:
        raise ck.ResumeError(f"{plan.source}: {exc}") from None
    mixture_groups = groups
    if batch_factory is None:
        from trainer.data import StreamFactory, group_names
        from trainer.model_setup import tokenizer_spec

        mixture_groups = mixture_groups or group_names(cfg.mixture_path)
        factory: Callable[[], Iterator] = StreamFactory(
            mixture_path=str(cfg.mixture_path), packing=packing_config(cfg, mc), tokenizer_spec=tokenizer_spec(cfg),
            rank=rank, world_size=world, seed=cfg.data.data_seed,
            loader=copy.deepcopy(loader_state), threads=cfg.data.dataloader_threads)
    else:
        factory = batch_factory(stream_state, rank, world)
    mixture_groups = mixture_groups or []
    mode = "process" if cfg.data.dataloader_workers > 0 else "thread"
    prefetch = Prefetcher(factory, depth=cfg.data.prefetch_factor * max(1, t.gradient_accumulation_steps),
                          mode=mode, workers=slots, pin_memory=use_cuda)

    # -- outputs ------------------------------------------------------------------------------------
    if is_main:
        cfg.results_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (cfg.results_dir / "training_args.json").write_text(training_args_json(cfg))
    sink = MetricsSink(cfg.results_dir, tensorboard=t.enable_tensorboard, enabled=is_main, print_fn=print_fn)
    if is_main:
        _event(cfg, {"event": "start", "step": start_step, "reason": plan.reason, "world_size": world})
    peak = t.peak_device_tflops or (peak_tflops_from_name(torch.cuda.get_device_name(device)) if use_cuda else 0.0)
    channels = getattr(mc, "latent_channels", 64)
    window = Window(groups=mixture_groups)
    result = LoopResult(start_step=start_step, final_step=start_step,
                        resumed_from=(fetched[1] if fetched is not None else str(plan.source))
                        if plan.load_train_state else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_wait = total_time = 0.0
    window_start = time.perf_counter()
    end_step = min(t.total_steps, t.stop_at_step or t.total_steps)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else None

    def save(step_done: int) -> Path:
        if remote_ckpts is not None:
            return _save_checkpoint_remote(cfg, remote_ckpts, par, ema, optimizer, scheduler, mc, tokenizer,
                                           step_done, loader_state.to_json(), rank, world, is_main)
        return _save_checkpoint(cfg, par, ema, optimizer, scheduler, mc, tokenizer, step_done, loader_state.to_json(),
                                rank, world, is_main)

    try:
        step = start_step
        if start_step >= end_step:
            log(f"nothing to do: checkpoint is at step {start_step}, total_steps {t.total_steps}")
        while step < end_step:
            t_step = time.perf_counter()
            batches, wait = [], 0.0
            for _ in range(t.gradient_accumulation_steps):
                b, w = next(prefetch)
                batches.append(b)
                wait += w
            denom = global_denominators(batches, t.ce_loss_reweighting)
            ce_sum = mse_sum = 0.0
            for micro, batch in enumerate(batches):
                window.add_batch(batch)
                batch = batch.to(device, non_blocking=use_cuda)
                noise = _noise(batch, channels, step_seed(t.global_seed, rank, step, micro, "eps"), device)
                vae_gen = torch.Generator(device=device).manual_seed(
                    step_seed(t.global_seed, rank, step, micro, "vae"))
                last = micro == len(batches) - 1
                with (par.no_sync() if not last else contextlib.nullcontext()):
                    with (amp if amp is not None else contextlib.nullcontext()):
                        out = par.step_module(batch, noise, vae_gen)
                    parts = compute_loss(out.ce, out.mse, batch, denom, ce_weight=t.ce_weight,
                                         mse_weight=t.mse_weight, reweighting=t.ce_loss_reweighting,
                                         visual_gen=t.visual_gen, world=world)
                    parts.loss.backward()
                ce_sum += parts.ce_sum
                mse_sum += parts.mse_sum
            grad_norm = clip_grad_norm(trainable, t.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            ema_update(ema, model, t.ema)
            optimizer.zero_grad(set_to_none=True)
            for b in batches:
                loader_state.consumed(b)
            step += 1
            if use_cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_step
            total_wait += wait
            total_time += dt

            sums = torch.tensor([ce_sum, mse_sum], dtype=torch.float64)
            all_reduce_sum(sums)
            ce = float(sums[0]) / denom.ce if denom.ce > 0 else None
            mse = float(sums[1]) / denom.mse if denom.mse > 0 else None
            loss = (t.ce_weight * (ce or 0.0)) + (t.mse_weight * (mse or 0.0) if t.visual_gen else 0.0)
            result.history.append({"step": step, "ce": ce, "mse": mse, "loss": loss,
                                   "grad_norm": float(grad_norm), "lr": lr_used})
            window.steps += 1
            window.step_time += dt
            window.data_wait += wait
            window.ce_sum += ce_sum
            window.mse_sum += mse_sum
            window.grad_norm_sum += float(grad_norm)
            # the window's denominators are global already: count them once (on rank 0) for the reduction
            if is_main:
                window.ce_denom += denom.ce
                window.mse_denom += denom.mse
            result.final_step = step

            _maybe_fail(cfg, rank, step)
            do_log = step % t.log_every == 0 or step == end_step
            do_save = step % t.save_every == 0 or step == end_step
            rec: dict[str, Any] = {}
            if do_log:
                red = window.reduce()
                lrs = {g.get("name", str(i)): g["lr"] * lr_used / max(scheduler.get_last_lr()[0], 1e-30)
                       for i, g in enumerate(optimizer.param_groups)} if len(optimizer.param_groups) > 1 else {}
                rec = summarise(red, world=world, step=step, lr=lr_used, lrs=lrs,
                                wall=time.perf_counter() - window_start, device=device,
                                llm_config=getattr(mc, "llm", None), peak_tflops=peak)
                sink.log(rec)
                window = Window(groups=mixture_groups)
                window_start = time.perf_counter()
            ckpt_path = save(step) if do_save else None
            if ckpt_path is not None:
                result.checkpoints.append(str(ckpt_path))
                log(f"saved checkpoint {ckpt_path}")
                if is_main:
                    _event(cfg, {"event": "checkpoint", "step": step, "path": str(ckpt_path)})
            if reporter is not None and (do_log or do_save):
                reporter.report({"step": step, **{k: v for k, v in rec.items() if v is not None}},
                                ckpt_path if is_main else None)
    finally:
        prefetch.close()
        sink.close()
        if own_group:
            dist.destroy_process_group()
    result.data_wait_fraction = total_wait / total_time if total_time > 0 else 0.0
    log(f"done at step {result.final_step}; data wait {100 * result.data_wait_fraction:.1f}% of step time")
    return result


def _load_checked(model, source: Path, filename: str, *, strict: bool, log) -> None:
    """Load weights; never let a wrong directory silently leave the model at random init."""
    from trainer.model_setup import load_weights_into

    missing, unexpected, loaded = load_weights_into(model, source, filename)
    if loaded == 0:
        raise ck.ResumeError(f"{source / filename}: no tensor matches the model (unexpected keys e.g. "
                             f"{unexpected[:3]}); is this a checkpoint of this architecture?")
    if missing and strict:
        raise ck.ResumeError(f"{source / filename} lacks {len(missing)} tensors of the model (e.g. {missing[:3]}); "
                             f"a training checkpoint must resume completely")
    if missing:
        log(f"note: {len(missing)} tensors not in {filename} keep their init, e.g. {missing[:3]}")
    if unexpected:
        log(f"warning: {len(unexpected)} unexpected keys in {filename} ignored, e.g. {unexpected[:3]}")


def _cuda_device() -> torch.device:
    """This worker's GPU: Ray Train's assignment inside a Ray worker, else LOCAL_RANK (torchrun style)."""
    try:
        import ray.train.torch

        device = ray.train.torch.get_device()
    except Exception:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if isinstance(device, list):
        device = device[0]
    torch.cuda.set_device(device)
    return device


def _single_process_group(backend: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _event(cfg: TrainConfig, rec: dict) -> None:
    """One line per start / checkpoint in results_dir/events.jsonl: the run's history across restarts."""
    import json

    with open(cfg.results_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({**rec, "time": time.time()}) + "\n")


def _save_checkpoint(cfg: TrainConfig, par: Parallel, ema, optimizer, scheduler, mc, tokenizer, step: int,
                     stream_state: Optional[dict], rank: int, world: int, is_main: bool) -> Optional[Path]:
    """Every rank writes its own files into the temp dir; rank 0 the full weights; then rank 0 marks the
    directory complete and renames it into place (checkpointing.finalize). Needs a disk all ranks share."""
    root = cfg.checkpoint_dir
    if is_main:
        ck.prepare_temp(root, step)
    barrier()
    tmp = ck.temp_dir(root, step)
    model_state = full_state_dict(par.model, par.kind)   # collectives under FSDP: every rank calls
    ema_state = full_state_dict(ema, par.kind)
    _write_rank_files(tmp, par, optimizer, stream_state, rank, world)
    files = _per_rank_files(par, world)
    if is_main:
        files += _write_shared_files(tmp, cfg, model_state, ema_state, scheduler, mc, tokenizer, step, world)
    barrier()
    final = None
    if is_main:
        final = ck.finalize(root, step, files, {"world_size": world})
        ck.rotate(root, cfg.train.max_checkpoints)
    barrier()
    return final if is_main else (root / ck.step_dir_name(step))


def _write_rank_files(folder: Path, par: Parallel, optimizer, stream_state: Optional[dict], rank: int,
                      world: int) -> list[str]:
    """This rank's own files: its optimizer shard (if it writes one) and its stream state."""
    own = []
    if par.optimizer_shard is not None:
        idx, count = par.optimizer_shard
        ck.save_state_file(optimizer_state_for_save(optimizer), folder / ck.optimizer_file(idx, count))
        own.append(ck.optimizer_file(idx, count))
    ck.write_json(folder / ck.stream_state_file(rank, world), stream_state)
    own.append(ck.stream_state_file(rank, world))
    return own


def _per_rank_files(par: Parallel, world: int) -> list[str]:
    """Every rank's files a complete checkpoint holds (stream states, optimizer shards)."""
    files = [ck.stream_state_file(i, world) for i in range(world)]
    if par.kind == "fsdp":
        shard_count = par.optimizer_shard[1] if par.optimizer_shard else par.optimizer_load_shard[1]
        files += [ck.optimizer_file(i, shard_count) for i in range(shard_count)]
    else:
        files.append(ck.optimizer_file(0, 1))
    return files


def _write_shared_files(folder: Path, cfg: TrainConfig, model_state, ema_state, scheduler, mc, tokenizer,
                        step: int, world: int) -> list[str]:
    """Rank 0: full weights, EMA, scheduler, train state, inference files. Returns the marker-listed names."""
    from model.checkpoint import VAE_FILES, save_weights, write_inference_files
    from trainer.model_setup import split_vae

    files = []
    model_main, vae_state = split_vae(model_state, cfg.train.freeze_vae)
    ema_main, _ = split_vae(ema_state, cfg.train.freeze_vae)
    save_weights(model_main, folder / ck.MODEL_FILE)
    save_weights(ema_main, folder / ck.EMA_FILE)
    if vae_state is not None:  # frozen VAE: ae.safetensors (FLUX names), as checkpoints are loaded
        save_weights(vae_state, folder / VAE_FILES[0])
        files.append(VAE_FILES[0])
    ck.save_state_file(scheduler.state_dict(), folder / ck.SCHEDULER_FILE)
    ck.write_json(folder / ck.TRAIN_STATE_FILE, {"step": step, "world_size": world, "train_steps": step})
    write_inference_files(folder, mc, tokenizer, training_args=cfg.flat())
    files += [ck.MODEL_FILE, ck.EMA_FILE, ck.SCHEDULER_FILE, ck.TRAIN_STATE_FILE, ck.TRAINING_ARGS_FILE]
    return files


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


def _save_checkpoint_remote(cfg: TrainConfig, remote, par: Parallel, ema, optimizer, scheduler, mc, tokenizer,
                            step: int, stream_state: Optional[dict], rank: int, world: int, is_main: bool) -> Path:
    """Object storage, no shared disk: every rank stages its own files on its own disk and uploads them;
    after all uploads (a collective), rank 0 uploads the shared files, seals the checkpoint with
    COMPLETE.json last, rotates, and keeps its staged part as the local copy it reports to Ray Train."""
    import shutil

    root = cfg.checkpoint_dir
    step_dir = remote / ck.step_dir_name(step)
    begun: tuple[Optional[str], Optional[str]] = (None, None)
    if is_main:
        try:   # a re-saved step (restart): withdraw the old attempt before anyone uploads
            begun = (sc.begin_remote_save(step_dir), None)
        except Exception as exc:
            begun = (None, f"rank 0 could not prepare {step_dir.display()}: {exc!r}")
    save_id, err = broadcast_object(begun)
    if err:
        raise RuntimeError(f"checkpoint {step} not saved: {err}")
    model_state = full_state_dict(par.model, par.kind)   # collectives under FSDP: every rank calls
    ema_state = full_state_dict(ema, par.kind)
    staging = ck.prepare_temp(root, step) if is_main else \
        _fresh_dir(root / f"{ck.TMP_PREFIX}{ck.step_dir_name(step)}-rank{rank:05d}")
    err = None
    try:
        own = _write_rank_files(staging, par, optimizer, stream_state, rank, world)
        sc.upload_files(staging, own, step_dir)
    except Exception as exc:
        err = f"rank {rank} could not upload its files: {exc!r}"
    if not is_main:
        shutil.rmtree(staging, ignore_errors=True)
    _raise_if_any(err, f"checkpoint {step} not saved (no marker written)")   # all ranks' uploads done
    files = _per_rank_files(par, world)
    final = None
    if is_main:
        try:
            shared = _write_shared_files(staging, cfg, model_state, ema_state, scheduler, mc, tokenizer, step,
                                         world)
            sc.upload_files(staging, [f for f in _staged_names(staging) if f not in own], step_dir)
            files += shared
            marker = {"step": step, "world_size": world, "save_id": save_id}
            sc.seal_remote(step_dir, files, marker)               # COMPLETE.json last
            sc.rotate_remote(remote, cfg.train.max_checkpoints)
            final = ck.finalize(root, step, files, {**marker, "remote": step_dir.display()},
                                present=own + shared)
            ck.rotate(root, cfg.train.max_checkpoints, complete=lambda p: ck.read_marker(p) is not None)
        except Exception as exc:
            err = f"rank 0 could not complete it: {exc!r}"
    _raise_if_any(err, f"checkpoint {step} not saved")
    return final if is_main else (root / ck.step_dir_name(step))


def _staged_names(folder: Path) -> list[str]:
    """Relative names of every file under a staging folder (inference files live in sub-folders)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fresh_dir(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _checkpoint_step(path: Optional[Path]) -> Optional[int]:
    """The step of the checkpoint Ray Train restarts from (its folder is named after it; the folder itself
    may be on another node's disk)."""
    if path is None:
        return None
    if path.name.isdigit():
        return int(path.name)
    marker = ck.read_marker(path)
    return int(marker["step"]) if marker and "step" in marker else None


def _plan_remote(cfg: TrainConfig, remote, ray_checkpoint: Optional[Path], is_main: bool
                 ) -> tuple[ck.ResumePlan, Optional[tuple[int, str]]]:
    """Rank 0 picks the remote checkpoint (Ray Train's restart step, else the newest complete one) and
    broadcasts it, so every rank resumes the same step; each rank fetches the files it needs onto its own
    disk. Without a remote checkpoint: resume_from / model_path / random init, as on local storage."""
    t = cfg.train
    choice = None
    if is_main:
        try:
            picked = sc.choose_remote(remote, _checkpoint_step(ray_checkpoint), t.auto_resume)
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
        local = sc.fetch_checkpoint(remote, step, cfg.checkpoint_dir)
    except Exception as exc:
        ferr = f"{exc!r}"
    _raise_if_any(ferr, f"cannot fetch checkpoint {step} from {remote.display()}")
    plan = ck.plan_fetched(local, reason, restart=restart, resume_model_only=t.resume_model_only,
                           resume_model_optimizer=t.resume_model_optimizer)
    return plan, (step, (remote / ck.step_dir_name(step)).display())
