"""The per-worker training loop: runs inside each Ray Train worker, or directly in-process (world size 1, no
process group) for tests and debugging. `train_loop` is the entry point; `Trainer` holds one rank's run,
one method per phase, so the loop reads in the order things happen.

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

from trainer.checkpoint import remote as cr
from trainer.checkpoint import local as ck
from trainer.config import TrainConfig, training_args_json
from pipelines.mixture.stages import stage_record
from trainer.data import LoaderState, StreamFactory, load_mixture
from trainer.ema import ema_update, make_ema
from trainer.evaluation import TrainingEvaluator
from trainer.loss import Denominators, all_reduce_sum, compute_loss, global_denominators
from trainer.metrics import MetricsSink, Window, peak_tflops_from_name, summarise
from trainer.optim import build_optimizer
from trainer.parallel import Parallel, clip_grad_norm, rank_and_world, wrap_ddp, wrap_ema_fsdp, wrap_fsdp
from trainer.prefetch import Prefetcher
from trainer.schedule import WarmupScheduler

BatchFactory = Callable[[Optional[dict], int, int], Callable[[int, int], Iterator]]


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


def train_loop(cfg: TrainConfig | dict, *, reporter: Optional[Reporter] = None,
               ray_checkpoint: Optional[Path] = None, batch_factory: Optional[BatchFactory] = None,
               model_builder: Optional[Callable[[TrainConfig], Any]] = None,
               groups: Optional[list[str]] = None, print_fn: Callable[[str], None] = print) -> LoopResult:
    """Train until total_steps (or stop_at_step). `batch_factory(state, rank, world)` and `model_builder(cfg)`
    replace the mixture stream and the model in unit tests; by default they come from the config."""
    trainer = Trainer(cfg, reporter=reporter, ray_checkpoint=ray_checkpoint, batch_factory=batch_factory,
                      model_builder=model_builder, groups=groups, print_fn=print_fn)
    return trainer.setup().run()


class Trainer:
    """One rank's training run. `setup()` runs the phases before the first step, in this order: devices and
    seeds (before any weight is initialised), the model, the start plan and its weights (before wrapping),
    parallelism with the optimizer, the train state of a full resume (once the optimizer exists), data,
    outputs. `run()` then calls `train_step()` and `after_step()` (log, save, report) until the end step."""

    def __init__(self, cfg: TrainConfig | dict, *, reporter: Optional[Reporter] = None,
                 ray_checkpoint: Optional[Path] = None, batch_factory: Optional[BatchFactory] = None,
                 model_builder: Optional[Callable[[TrainConfig], Any]] = None,
                 groups: Optional[list[str]] = None, print_fn: Callable[[str], None] = print) -> None:
        self.cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        self.reporter, self.ray_checkpoint = reporter, ray_checkpoint
        self.batch_factory, self.model_builder, self.groups = batch_factory, model_builder, groups
        self.print_fn = print_fn
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        self.own_group = False    # a one-rank process group this trainer created (and destroys)
        self.lora = None          # trainer.adapters.LoraRun under --finetuning_type lora
        if self.cfg.train.finetuning_type == "lora":
            from trainer.adapters import LoraRun

            self.lora = LoraRun(self.cfg)

    def log(self, msg: str) -> None:
        if self.is_main:
            self.print_fn(f"[train] {msg}")

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        self.setup_devices()
        self.build_model()
        self.plan_start()
        self.load_weights()
        self.parallelize()
        self.restore()
        self.build_data()
        self.open_outputs()
        self.evaluator = TrainingEvaluator.build(self)   # None without an `eval:` section
        return self

    def setup_devices(self) -> None:
        """This rank's device, torch threads, seeds and determinism."""
        t, r = self.cfg.train, self.cfg.run
        self.use_cuda = r.use_gpu and torch.cuda.is_available()
        if r.use_gpu and not self.use_cuda:
            raise RuntimeError("--use_gpu True but this worker sees no CUDA device")
        self.device = _cuda_device() if self.use_cuda else torch.device("cpu")
        if not self.use_cuda:
            torch.set_num_threads(r.torch_threads or 1)
        elif r.torch_threads:
            torch.set_num_threads(r.torch_threads)
        _seed_all(t.global_seed * self.world + self.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.use_cuda else None

    def build_model(self) -> None:
        """The model (randomly initialised), its config and tokenizer."""
        if self.model_builder is None:
            from trainer.model_setup import build_model

            built = build_model(self.cfg)
            self.model, self.mc, self.tokenizer = built.model, built.config, built.tokenizer
        else:
            self.model, self.mc, self.tokenizer = self.model_builder(self.cfg)

    def plan_start(self) -> None:
        """Where the weights come from. With --storage_path s3://... object storage is the checkpoint store:
        rank 0 picks the step and every rank fetches its own files; else the local checkpoint dir,
        resume_from, model_path or random init."""
        cfg = self.cfg
        self.remote = cr.remote_checkpoint_root(cfg.run.storage_path, cfg.run_name)
        self.fetched: Optional[cr.FetchedCheckpoint] = None
        if self.remote is not None:
            self.plan, self.fetched = cr.plan_remote(cfg, self.remote, self.ray_checkpoint, self.is_main)
        else:
            self.plan = ck.plan_resume_for(cfg, ray_checkpoint=self.ray_checkpoint)
        self.log(f"start: {self.plan.reason}")
        for note in self.plan.notes:
            self.log(f"note: {note}")

    def load_weights(self) -> None:
        """The planned weights (and the VAE's own file when not resuming), the freeze flags, then the EMA:
        from the source's EMA weights when it has them, else from the weights just loaded."""
        from trainer.model_setup import apply_freeze_flags

        plan = self.plan
        if self.lora is not None:   # base from model_path, adapters from the checkpoint being resumed
            self.ema = self.lora.load(self.model, plan, self.log)
            self.model.train()
            return
        if plan.source is not None:
            ck.load_weights_checked(self.model, plan.source, plan.weights_file, strict=plan.load_train_state,
                                    log=self.log)
        vae_path = self.cfg.model.vae_path
        if vae_path and not plan.load_train_state and getattr(self.model, "vae_model", None) is not None:
            from model.checkpoint import load_vae_weights

            load_vae_weights(self.model.vae_model, vae_path, strict=True)   # FLUX AE (ae.safetensors)
            self.log(f"VAE weights from {vae_path}")
        apply_freeze_flags(self.model, self.cfg)
        self.ema = make_ema(self.model)
        if plan.source is not None:
            ema_file = plan.ema_file if (plan.source / plan.ema_file).is_file() else plan.weights_file
            ck.load_weights_checked(self.ema, plan.source, ema_file, strict=plan.load_train_state, log=self.log)
        self.model.train()
        self.ema.train()  # upstream keeps the EMA in train mode (its layers dispatch on .training)

    def parallelize(self) -> None:
        """FSDP2 (--parallelism fsdp, or auto on GPU) or DDP around the model and its EMA, then the
        optimizer and the LR schedule."""
        t, r = self.cfg.train, self.cfg.run
        use_fsdp = r.parallelism == "fsdp" or (r.parallelism == "auto" and self.use_cuda)
        self.par = self._wrap_fsdp() if use_fsdp else self._wrap_ddp()
        self.optimizer = build_optimizer(self.model, lr=t.lr, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
                                         llm_lr=t.llm_lr, vit_lr=t.vit_lr, vae_lr=t.vae_lr)
        self.scheduler = WarmupScheduler(self.optimizer, kind=t.lr_scheduler, warmup_steps=t.warmup_steps,
                                         total_steps=t.total_steps, lr=t.lr, min_lr=t.min_lr)
        if self.lora is not None:
            self.ema = self.lora.place_ema(self.model, self.ema)
        self.state = ck.TrainingState(self.par, self.ema, self.optimizer, self.scheduler, self.mc, self.tokenizer,
                                      adapter=self.lora)

    def _wrap_fsdp(self) -> Parallel:
        # no model.to(device) here: fully_shard moves one unit at a time to the mesh's device and keeps only
        # its shard, so the full fp32 model (and EMA: ~58 GB each at 7B) never sits on one GPU
        t = self.cfg.train
        if not dist.is_initialized():   # FSDP2 needs a process group, even for one rank
            _single_process_group("nccl" if self.use_cuda else "gloo")
            self.own_group = True
        par = wrap_fsdp(self.model, freeze_vae=t.freeze_vae, sharding_strategy=t.sharding_strategy,
                        num_replicate=t.num_replicate, num_shard=t.num_shard, cpu_offload=t.cpu_offload,
                        activation_checkpointing=t.activation_checkpointing and self.use_cuda,
                        reshard_after_forward=t.sharding_strategy != "NO_SHARD", device_type=self.device.type,
                        param_dtype=torch.bfloat16 if self.use_cuda else None)
        if self.lora is None:   # a LoRA run's EMA holds adapter tensors only, sharded in place_ema
            wrap_ema_fsdp(self.ema, par.mesh, cpu_offload=t.cpu_offload)   # shards on the same device as the model's
        return par

    def _wrap_ddp(self) -> Parallel:
        self.model.to(self.device)
        self.ema.to(self.device)
        return wrap_ddp(self.model, freeze_vae=self.cfg.train.freeze_vae)

    def restore(self) -> None:
        """The train state of a full resume (step, this rank's optimizer shard, LR schedule, stream state);
        then a checkpoint fetched from object storage is dropped from this node's disk."""
        plan = self.plan
        self.step, self.stream_state = 0, None
        if plan.load_train_state and plan.source is not None:
            self.step, self.stream_state = ck.restore_train_state(
                plan.source, self.state, load_optimizer=plan.load_optimizer, rank=self.rank, world=self.world,
                fetch=self.fetched.fetch if self.fetched is not None else None,
                slots=max(1, self.cfg.data.dataloader_workers))
            self.log(f"resumed train state at step {self.step}")
        if self.fetched is not None:   # everything is in memory now
            self.fetched.release()
        self.start_step = self.step

    def build_data(self) -> None:
        """Batches: the mixture stream per loader slot (restored from the stream state), behind a prefetcher."""
        cfg = self.cfg
        slots = max(1, cfg.data.dataloader_workers)
        try:
            self.loader_state = LoaderState.from_json(self.stream_state, slots)
        except ValueError as exc:
            raise ck.ResumeError(f"{self.plan.source}: {exc}") from None
        factory = self._batch_factory()
        mode = "process" if cfg.data.dataloader_workers > 0 else "thread"
        depth = cfg.data.prefetch_factor * max(1, cfg.train.gradient_accumulation_steps)
        self.prefetch = Prefetcher(factory, depth=depth, mode=mode, workers=slots, pin_memory=self.use_cuda)

    def _batch_factory(self) -> Callable[[int, int], Iterator]:
        """The mixture config is parsed here, once per rank; the loader slots get the parsed object."""
        if self.batch_factory is not None:
            self.mixture_groups = self.groups or []
            return self.batch_factory(self.stream_state, self.rank, self.world)
        from trainer.model_setup import packing_config, tokenizer_spec

        cfg = self.cfg
        mixture = load_mixture(str(cfg.mixture_path), cfg.data.catalog, cfg.data.shards)
        self.mixture_groups = self.groups or mixture.group_names
        self.mixture_cfg = mixture
        if self.is_main:   # what inference defaults to: the transforms trained at (model/inference/defaults.py)
            from trainer.checkpoint.inference_record import inference_record

            try:
                self.state.inference = inference_record(mixture)
            except Exception as exc:   # metadata only: training goes on, inference then keeps its defaults
                self.log(f"note: checkpoints will record no inference transforms ({type(exc).__name__}: {exc})")
        return StreamFactory(mixture=mixture, packing=packing_config(cfg, self.mc),
                             tokenizer_spec=tokenizer_spec(cfg), rank=self.rank, world_size=self.world,
                             seed=cfg.data.data_seed, loader=copy.deepcopy(self.loader_state), threads=cfg.data.dataloader_threads,
                             grad_accum=max(1, cfg.train.gradient_accumulation_steps))

    def open_outputs(self) -> None:
        """The run and checkpoint directories, training_args.json, the metrics sink and the start event;
        then the counters of the run."""
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            cfg.results_dir.mkdir(parents=True, exist_ok=True)
            cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (cfg.results_dir / "training_args.json").write_text(training_args_json(cfg))
        self.sink = MetricsSink(cfg.results_dir, tensorboard=t.enable_tensorboard, enabled=self.is_main,
                                print_fn=self.print_fn)
        if self.is_main:
            _event(cfg, {"event": "start", "step": self.start_step, "reason": self.plan.reason,
                         "world_size": self.world})
        self.peak = t.peak_device_tflops or (
            peak_tflops_from_name(torch.cuda.get_device_name(self.device)) if self.use_cuda else 0.0)
        self.channels = getattr(self.mc, "latent_channels", 64)
        self.window = Window(groups=self.mixture_groups)
        resumed = (self.fetched.uri if self.fetched is not None else str(self.plan.source)) \
            if self.plan.load_train_state else None
        self.result = LoopResult(start_step=self.start_step, final_step=self.start_step, resumed_from=resumed)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.total_wait = self.total_time = 0.0
        self.end_step = min(t.total_steps, t.stop_at_step or t.total_steps)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        """Train until the end step; the prefetcher, sink and an own process group are closed however it ends."""
        self.window_start = time.perf_counter()
        try:
            if self.start_step >= self.end_step:
                self.log(f"nothing to do: checkpoint is at step {self.start_step}, "
                         f"total_steps {self.cfg.train.total_steps}")
            while self.step < self.end_step:
                lr_used = self.train_step()
                self.after_step(lr_used)
        finally:
            self.close()
        result = self.result
        result.data_wait_fraction = self.total_wait / self.total_time if self.total_time > 0 else 0.0
        self.log(f"done at step {result.final_step}; data wait {100 * result.data_wait_fraction:.1f}% of step time")
        return result

    def train_step(self) -> float:
        """One optimizer step over gradient_accumulation_steps micro-batches, its losses recorded (global
        means); returns the learning rate it used."""
        t = self.cfg.train
        t_step = time.perf_counter()
        batches, wait = self._next_batches()
        denom = global_denominators(batches, t.ce_loss_reweighting)
        ce_sum = mse_sum = 0.0
        for micro, batch in enumerate(batches):
            parts = self._micro_step(batch, micro, denom, last=micro == len(batches) - 1)
            ce_sum += parts.ce_sum
            mse_sum += parts.mse_sum
        grad_norm = clip_grad_norm(self.trainable, t.max_grad_norm)
        lr_used = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.ema, self.model, t.ema)
        self.optimizer.zero_grad(set_to_none=True)
        for b in batches:
            self.loader_state.consumed(b)
        self.step += 1
        if self.use_cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t_step
        self.total_wait += wait
        self.total_time += dt
        self._record(ce_sum, mse_sum, denom, float(grad_norm), lr_used)
        self._add_to_window(ce_sum, mse_sum, denom, float(grad_norm), dt, wait)
        return lr_used

    def _next_batches(self) -> tuple[list, float]:
        batches, wait = [], 0.0
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            b, w = next(self.prefetch)
            batches.append(b)
            wait += w
        return batches, wait

    def _micro_step(self, batch, micro: int, denom: Denominators, last: bool):
        """Forward and backward of one micro-batch (gradients synchronised on the last one only); its noise
        is a pure function of (seed, rank, step, micro-step)."""
        t, device = self.cfg.train, self.device
        self.window.add_batch(batch)
        batch = batch.to(device, non_blocking=self.use_cuda)
        noise = _noise(batch, self.channels, step_seed(t.global_seed, self.rank, self.step, micro, "eps"), device)
        vae_seed = step_seed(t.global_seed, self.rank, self.step, micro, "vae")
        vae_gen = torch.Generator(device=device).manual_seed(vae_seed)
        with (self.par.no_sync() if not last else contextlib.nullcontext()):
            with (self.amp if self.amp is not None else contextlib.nullcontext()):
                out = self.par.step_module(batch, noise, vae_gen)
            parts = compute_loss(out.ce, out.mse, batch, denom, ce_weight=t.ce_weight, mse_weight=t.mse_weight,
                                 reweighting=t.ce_loss_reweighting, visual_gen=t.visual_gen, world=self.world)
            parts.loss.backward()
        return parts

    def _record(self, ce_sum: float, mse_sum: float, denom: Denominators, grad_norm: float, lr_used: float) -> None:
        """The step's global mean losses into the history."""
        t = self.cfg.train
        sums = torch.tensor([ce_sum, mse_sum], dtype=torch.float64)
        all_reduce_sum(sums)
        ce = float(sums[0]) / denom.ce if denom.ce > 0 else None
        mse = float(sums[1]) / denom.mse if denom.mse > 0 else None
        loss = (t.ce_weight * (ce or 0.0)) + (t.mse_weight * (mse or 0.0) if t.visual_gen else 0.0)
        self.result.history.append({"step": self.step, "ce": ce, "mse": mse, "loss": loss,
                                    "grad_norm": grad_norm, "lr": lr_used})
        self.result.final_step = self.step

    def _add_to_window(self, ce_sum: float, mse_sum: float, denom: Denominators, grad_norm: float, dt: float,
                       wait: float) -> None:
        w = self.window
        w.steps += 1
        w.step_time += dt
        w.data_wait += wait
        w.ce_sum += ce_sum
        w.mse_sum += mse_sum
        w.grad_norm_sum += grad_norm
        # the window's denominators are global already: count them once (on rank 0) for the reduction
        if self.is_main:
            w.ce_denom += denom.ce
            w.mse_denom += denom.mse

    def after_step(self, lr_used: float) -> None:
        """Failure injection, then a log line, a checkpoint and a report to Ray Train when the step asks."""
        t, step = self.cfg.train, self.step
        _maybe_fail(self.cfg, self.rank, step)
        do_log = step % t.log_every == 0 or step == self.end_step
        do_save = step % t.save_every == 0 or step == self.end_step
        rec = self.log_metrics(lr_used) if do_log else {}
        evaluated = self.evaluator.maybe_run(self) if self.evaluator is not None else None
        ckpt_path = self.save() if do_save else None
        if evaluated is not None:
            self.evaluator.record_best(evaluated, ckpt_path)
            rec = {**rec, **evaluated}
        if self.reporter is not None and (do_log or do_save):
            self.reporter.report({"step": step, **{k: v for k, v in rec.items() if v is not None}},
                                 ckpt_path if self.is_main else None)

    def log_metrics(self, lr_used: float) -> dict[str, Any]:
        """Reduce the window over ranks, write its record (console, metrics.jsonl, TensorBoard), start a new one."""
        reduced = self.window.reduce()   # a collective
        opt = self.optimizer
        lrs = {g.get("name", str(i)): g["lr"] * lr_used / max(self.scheduler.get_last_lr()[0], 1e-30)
               for i, g in enumerate(opt.param_groups)} if len(opt.param_groups) > 1 else {}
        rec = summarise(reduced, world=self.world, step=self.step, lr=lr_used, lrs=lrs,
                        wall=time.perf_counter() - self.window_start, device=self.device,
                        llm_config=getattr(self.mc, "llm", None), peak_tflops=self.peak)
        mix = getattr(self, "mixture_cfg", None)
        if mix is not None:   # the configured weights in force (jobs/plot.py draws them) and the curriculum stage
            rec.update({f"weight/{g}": w for g, w in zip(mix.group_names, mix.weights(self.step - 1))})
            rec.update(stage_record(mix.stages, self.step - 1))
        self.sink.log(rec)
        self.window = Window(groups=self.mixture_groups)
        self.window_start = time.perf_counter()
        return rec

    def save(self) -> Path:
        """A checkpoint of the current step (object storage or the shared disk); returns its local folder."""
        step, stream_state = self.step, self.loader_state.to_json()
        if self.remote is not None:
            path = cr.save_checkpoint_remote(self.cfg, self.remote, self.state, step, stream_state, self.rank,
                                             self.world)
        else:
            path = ck.save_checkpoint(self.cfg, self.state, step, stream_state, self.rank, self.world)
        self.result.checkpoints.append(str(path))
        self.log(f"saved checkpoint {path}")
        if self.is_main:
            _event(self.cfg, {"event": "checkpoint", "step": step, "path": str(path)})
        return path

    def close(self) -> None:
        self.prefetch.close()
        self.sink.close()
        if self.own_group:
            dist.destroy_process_group()


# -- helpers --------------------------------------------------------------------------------------------
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
