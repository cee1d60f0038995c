"""Ray Train launch: TorchTrainer + ScalingConfig / RunConfig / FailureConfig / CheckpointConfig.

Ray: joins a cluster when `--address` or RAY_ADDRESS is given (`ray job submit` sets it), else starts an
embedded local Ray with enough logical CPUs that train workers (fractional CPUs on CPU) never starve
the other Ray work. CPU workers use gloo + DDP; GPU workers NCCL + FSDP2 (trainer.parallel).
Checkpoints are written by the loop straight into the run directory and reported to Ray Train without a
copy (NO_UPLOAD), so a restarted worker group resumes from exactly the files the loop wrote.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.remote import remote_checkpoint_root
from trainer.config import TrainConfig, local_runs_root, resolve_paths


REPORTED = ("step", "ce", "mse", "lr", "grad_norm", "tokens_per_sec", "data_wait_fraction", "mfu")


class RayReporter:
    """ray.train.report at every log/save step on every rank (Ray requires equal call counts)."""

    def report(self, metrics: dict, checkpoint_dir: Optional[Path]) -> None:
        import ray.train

        # the full record is in metrics.jsonl; Ray gets the headline numbers (it logs every report)
        clean = {k: metrics[k] for k in REPORTED if isinstance(metrics.get(k), (int, float))}
        if checkpoint_dir is not None:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
            ray.train.report(clean, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        else:
            ray.train.report(clean)


def train_func(config: dict) -> None:
    """Runs in every Ray Train worker (the process group is already set up by TorchTrainer)."""
    import ray.train

    if config.get("_repo_root") and config["_repo_root"] not in sys.path:
        sys.path.insert(0, config["_repo_root"])
    from trainer.loop import train_loop

    _record_worker(config["cfg"])
    ckpt = ray.train.get_checkpoint()
    ray_ckpt = Path(ckpt.path) if ckpt is not None else None

    def echo(line: str) -> None:
        # plain stdout: Ray Train patches print() into a logger that the driver would show twice
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    train_loop(config["cfg"], reporter=RayReporter(), ray_checkpoint=ray_ckpt, print_fn=echo)


def _record_worker(cfg: dict) -> None:
    """One line per worker start in results_dir/workers.jsonl: rank and the Ray node it was placed on."""
    import json
    import socket

    import ray
    import ray.train

    ctx = ray.train.get_context()
    line = {"rank": ctx.get_world_rank(), "world_size": ctx.get_world_size(), "local_rank": ctx.get_local_rank(),
            "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    results = Path(cfg["train"]["results_dir"])
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "workers.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def init_ray(cfg: TrainConfig) -> str:
    """Connect to a cluster (address flag or RAY_ADDRESS) or start an embedded one. Returns a description."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return "existing Ray session"
    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    repo = str(Path(__file__).resolve().parent.parent)
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                                "RAY_AUTH_MODE": "disabled"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return f"Ray cluster at {address}"
    num_cpus = cfg.run.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
             object_store_memory=512 * 1024 * 1024)
    return f"embedded local Ray ({num_cpus} logical CPUs)"


def build_trainer(cfg: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.run
    cpus = r.cpus_per_worker if r.cpus_per_worker is not None else (4.0 if r.use_gpu else 0.5)
    scaling = ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": cpus},
                            placement_strategy=r.placement_strategy)
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=str(local_runs_root(r.storage_path)),   # s3://: each rank uploads its checkpoint files (loop)
        failure_config=FailureConfig(max_failures=r.max_failures),
        # rotation is the loop's job (max_checkpoints, complete checkpoints only)
        checkpoint_config=CheckpointConfig(num_to_keep=None),
    )
    payload = {"cfg": cfg.to_dict(), "_repo_root": str(Path(__file__).resolve().parent.parent)}
    # GPU: NCCL for the FSDP collectives plus gloo for the loop's CPU reductions (loss denominators, metrics,
    # broadcast of the resume choice); a plain "nccl" group has no CPU backend and fails on them
    return TorchTrainer(train_func, train_loop_config=payload, scaling_config=scaling, run_config=run_config,
                        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if r.use_gpu else "gloo"))


def launch(cfg: TrainConfig) -> dict[str, Any]:
    """Fit and return a summary (final metrics, checkpoint path, run dir)."""
    resolve_paths(cfg)
    if cfg.train.results_dir is None:
        # the run dir must be the Ray experiment dir so checkpoints are reported without a copy
        cfg.train.results_dir = str(cfg.results_dir)
    where = init_ray(cfg)
    trainer = build_trainer(cfg)
    result = trainer.fit()
    ckpt = result.checkpoint
    remote = remote_checkpoint_root(cfg.run.storage_path, cfg.run_name)
    return {"ray": where, "results_dir": str(cfg.results_dir), "checkpoint_dir": str(cfg.checkpoint_dir),
            "remote_checkpoint_dir": remote.display() if remote is not None else None,
            "last_checkpoint": ckpt.path if ckpt is not None else None,
            "metrics": dict(result.metrics or {}), "error": repr(result.error) if result.error else None}
