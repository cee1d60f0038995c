"""Ray Train launch: TorchTrainer + ScalingConfig / RunConfig / FailureConfig / CheckpointConfig.

Ray: joins a cluster when `--address` or RAY_ADDRESS is given (`ray job submit` sets it), else starts an
embedded local Ray of its own, also beside a cluster on the machine (pipelines.ingest.ray_session), with
enough logical CPUs that train workers (fractional CPUs on CPU) never starve the other Ray work. Under
`ray job submit`, paths inside the job's throw-away working directory are refused before Ray starts. A
user error inside a worker ends the run at once with one line; other failures get FailureConfig's restarts
(docs/cluster.md#which-ray). CPU workers use gloo + DDP; GPU workers NCCL + FSDP2 (trainer.parallel).
Checkpoints are written by the loop straight into the run directory and reported to Ray Train without a
copy (NO_UPLOAD), so a restarted worker group resumes from exactly the files the loop wrote.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from trainer.config import TrainConfig, local_runs_root, resolve_paths


# Quiet success (README "Running on a cluster"): Ray's own INFO lines stay in its log files; Ray Train's
# console shows errors only (its routine lines, and warnings that the state API is unreachable without a
# dashboard, are not the user's business); failures reach the user as the one line `launch` returns.
QUIET_DRIVER: dict[str, Any] = {"logging_level": logging.WARNING}
TRAIN_CONSOLE_LEVEL = "ERROR"
# Ray's Python loggers in the workers (warnings that the state API is unreachable without a dashboard) and
# Ray Train's per-worker console logger (its "Reporting training result" lines); a value set in the
# environment wins, and Ray's session log files keep everything
QUIET_WORKER_ENV = {name: os.environ.get(name, value) for name, value in (
    ("RAY_LOGGER_LEVEL", "error"), ("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0"))}
USER_ERROR_MARK = "medloom user error: "   # prefix of a UserError's message, found again on the driver
PROJECT_PACKAGES = ("datasets_catalog", "pipelines", "model", "trainer", "jobs")

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

    logging.getLogger(RAY_TRAIN_ERROR_LOGGER).addFilter(_without_user_errors)
    try:
        train_loop(config["cfg"], reporter=RayReporter(), ray_checkpoint=ray_ckpt, print_fn=echo)
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise UserError(USER_ERROR_MARK + one_line(cause)) from None
        raise


# Ray Train logs every exception of the training function with its traceback from this logger; a user
# error is the one line the driver prints instead (an infrastructure failure keeps its traceback)
RAY_TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"


def _without_user_errors(record: logging.LogRecord) -> bool:
    return USER_ERROR_MARK not in record.getMessage()


class UserError(RuntimeError):
    """A mistake in the run's inputs found inside a worker: reported once and not retried (restarting the
    worker group cannot fix it; FailureConfig.max_failures is for infrastructure failures)."""


def user_error_in(exc: BaseException) -> Optional[BaseException]:
    """The user error `exc` is or wraps (the batch loader re-raises its worker's error as the cause), or None."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if is_user_error(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def is_user_error(exc: BaseException) -> bool:
    """The project's own input errors (its ValueError subclasses: config, mixture, catalog, shard, packing,
    checkpoint layout ...) and checkpoint / resume refusals; not library errors nor the test failure hook."""
    from model.checkpoint import CheckpointError
    from trainer.checkpoint.local import ResumeError

    if isinstance(exc, (ResumeError, CheckpointError)):
        return True
    return isinstance(exc, ValueError) and type(exc).__module__.split(".")[0] in PROJECT_PACKAGES


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:1000] if text else type(exc).__name__


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


class LaunchError(ValueError):
    """A run that cannot start as asked (a path a submitted job cannot use, a cluster it cannot reach): one line."""


def init_ray(cfg: TrainConfig) -> str:
    """Join the cluster (--address or RAY_ADDRESS) or start an embedded local Ray of this process's own, even
    when a cluster runs on the machine (one note line says so). Returns a description."""
    import ray

    from pipelines.ingest.ray_session import RaySessionError, start_or_join

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return "existing Ray session"
    repo = str(Path(__file__).resolve().parent.parent)
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                                "RAY_AUTH_MODE": "disabled", **QUIET_WORKER_ENV}}
    num_cpus = cfg.run.num_cpus or max(4, os.cpu_count() or 1)
    try:
        where, note = start_or_join(
            cfg.run.address, join={"runtime_env": runtime_env, "log_to_driver": True, **QUIET_DRIVER},
            local={"num_cpus": num_cpus, "include_dashboard": False, "runtime_env": runtime_env,
                   "object_store_memory": 512 * 1024 * 1024, **QUIET_DRIVER})
    except RaySessionError as exc:
        raise LaunchError(str(exc)) from None
    if note:
        print(f"[train] note: {note}", flush=True)
    return where if where != "embedded local Ray" else f"embedded local Ray ({num_cpus} logical CPUs)"


def submitted_job_problems(cfg: TrainConfig) -> list[str]:
    """Under `ray job submit`: every path of the run that lies in the job's throw-away working directory
    (pipelines.ingest.ray_session.job_path_problem); [] elsewhere."""
    from pipelines.ingest.ray_session import job_path_problem, submitted_job_dir

    if submitted_job_dir() is None:
        return []
    checks = [("--storage_path", cfg.run.storage_path)]
    checks += [(f"--{name}", cfg.get(name)) for name in ("results_dir", "checkpoint_dir") if cfg.get(name)]
    shards = _shards_root(cfg)
    if shards is not None:
        checks.append((f"the shards folder of {cfg.mixture_path} (--shards, else its shards:, else its catalog's "
                        "output_dir)",
                       shards))
    return [p for p in (job_path_problem(value, what) for what, value in checks) if p]


def _shards_root(cfg: TrainConfig) -> Optional[str]:
    """Where the workers will read shards: --shards, else the mixture's shards:, else its catalog's output_dir
    (None when the mixture or catalog does not load: the config checks report that)."""
    if not cfg.mixture_path:
        return None
    try:
        from datasets_catalog.catalog import load_catalog
        from trainer.data import load_mixture

        mixture = load_mixture(cfg.mixture_path, cfg.data.catalog, cfg.data.shards)
        if mixture.shards is not None:
            return str(mixture.shards)
        return str(load_catalog(mixture.catalog_path()).output_dir)
    except (OSError, ValueError):
        return None


def build_trainer(cfg: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    r = cfg.run
    cpus = r.cpus_per_worker if r.cpus_per_worker is not None else (4.0 if r.use_gpu else 0.5)
    scaling = ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": cpus},
                            placement_strategy=r.placement_strategy)
    quiet: dict[str, Any] = {}
    try:
        from ray.train import LoggingConfig

        quiet["logging_config"] = LoggingConfig(log_level=TRAIN_CONSOLE_LEVEL)
    except ImportError:   # older Ray Train: its INFO lines stay on the console
        pass
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=str(local_runs_root(r.storage_path)),   # s3://: each rank uploads its checkpoint files (loop)
        failure_config=FailureConfig(max_failures=r.max_failures),
        # rotation is the loop's job (max_checkpoints, complete checkpoints only)
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        **quiet,
    )
    payload = {"cfg": cfg.to_dict(), "_repo_root": str(Path(__file__).resolve().parent.parent)}
    # GPU: NCCL for the FSDP collectives plus gloo for the loop's CPU reductions (loss denominators, metrics,
    # broadcast of the resume choice); a plain "nccl" group has no CPU backend and fails on them
    return _trainer_class()(train_func, train_loop_config=payload, scaling_config=scaling, run_config=run_config,
                            torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if r.use_gpu else "gloo"))


def _trainer_class():
    """TorchTrainer whose failure policy raises at once on a UserError and leaves every other failure to
    FailureConfig.max_failures. It hooks Ray Train's controller set-up (a private method: plain TorchTrainer,
    where a Ray version lacks it; a user error is then retried like any failure but still reported once)."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
        from ray.train.v2.api.exceptions import WorkerGroupError
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_initialize_and_run_controller"):
        return TorchTrainer

    class UserErrorsRaisePolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    USER_ERROR_MARK in str(e) for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    class MedLoomTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = UserErrorsRaisePolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    return MedLoomTrainer


def failure_line(exc: BaseException) -> tuple[str, bool]:
    """(one line for the user, whether it is a user error) from what TorchTrainer.fit raised: the first user
    error's message when a worker raised one, else the error type and the first line of each rank's failure."""
    failures = getattr(exc, "worker_failures", None) or {}
    texts = [(rank, str(e)) for rank, e in sorted(failures.items())] or [(None, str(exc))]
    for _, text in texts:
        if USER_ERROR_MARK in text:
            line = text.split(USER_ERROR_MARK, 1)[1].splitlines()[0].strip()
            return line, True
    parts = []
    for rank, text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
        first = lines[-1] if lines else type(exc).__name__
        parts.append(f"rank {rank}: {first}" if rank is not None else first)
    return f"{type(exc).__name__}: " + "; ".join(parts)[:1500], False


def launch(cfg: TrainConfig) -> dict[str, Any]:
    """Fit and return a summary (final metrics, checkpoint path, run dir; `error`: one line, `user_error`:
    whether it is the user's to fix). Raises LaunchError, before Ray starts, for what cannot run at all."""
    resolve_paths(cfg)
    problems = submitted_job_problems(cfg)
    if problems:
        raise LaunchError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems: " + " | ".join(problems))
    if cfg.train.results_dir is None:
        # the run dir must be the Ray experiment dir so checkpoints are reported without a copy
        cfg.train.results_dir = str(cfg.results_dir)
    where = init_ray(cfg)
    trainer = build_trainer(cfg)
    from trainer.checkpoint.remote import remote_checkpoint_root   # imports torch: not at preflight time

    remote = remote_checkpoint_root(cfg.run.storage_path, cfg.run_name)
    summary: dict[str, Any] = {
        "ray": where, "results_dir": str(cfg.results_dir), "checkpoint_dir": str(cfg.checkpoint_dir),
        "remote_checkpoint_dir": remote.display() if remote is not None else None,
        "last_checkpoint": None, "metrics": {}, "error": None, "user_error": False}
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and what else fit raises: one line, below
        line, user = failure_line(exc)
        summary.update(error=line if user else f"training failed after {cfg.run.max_failures} restart(s) of the "
                                               f"worker group: {line}", user_error=user)
        return summary
    ckpt = result.checkpoint
    summary.update(last_checkpoint=ckpt.path if ckpt is not None else None, metrics=dict(result.metrics or {}),
                   error=failure_line(result.error)[0] if result.error else None)
    return summary
