#!/usr/bin/env python
"""Train a BAGEL/UniMedVL-compatible model on Ray Train from the mixture's shards.

    python jobs/train.py --config configs/radiology_sft.yaml --model tiny --total_steps 30
    ray job submit --working-dir . -- python jobs/train.py --config configs/radiology_sft.yaml

Arguments keep the upstream names (see --help and docs/training.md). Before Ray starts, `preflight` runs
every check that can fail (resources, the mixture against catalog and shards as jobs/plan.py checks it,
the arguments, the eval: section, the resume source) and prints all problems at once, exit status 2.
"""
from __future__ import annotations

import json
import sys

from jobs import prog


def main(argv: list[str] | None = None) -> int:
    from pipelines.mixture.config import print_problems
    from trainer.config import ConfigError, help_text, load_config, resolve_paths

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text().replace("python jobs/train.py", prog("python jobs/train.py"), 1))
        return 0 if argv else 2
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    try:
        cfg = resolve_paths(load_config(argv))
    except ConfigError as exc:
        print_problems(exc)
        return 2
    problems, plan, mixture = preflight(cfg)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if len(problems) > 1:
            print(f"error: {len(problems)} problems above; nothing was started", file=sys.stderr)
        return 2
    if mixture is not None and mixture.catalog_from != "catalog: key":
        print(f"[train] catalog {mixture.catalog} ({mixture.catalog_from})")
    if plan is None:
        plan, problem = resume_plan(cfg)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    print(f"[train] run {cfg.run_name}: {cfg.run.num_workers} worker(s), "
          f"{'GPU' if cfg.run.use_gpu else 'CPU'}, {cfg.train.total_steps} steps; start: {plan.reason}")
    note = _topology_note(plan, cfg)
    if note:
        print(f"[train] note: {note}")
    from trainer.checkpoint.remote import remote_checkpoint_root

    remote = remote_checkpoint_root(cfg.run.storage_path, cfg.run_name)
    if remote is not None:
        print(f"[train] checkpoints go to {remote.display()} (each rank uploads its own files, COMPLETE.json "
              f"last; restarts resume from the newest complete one there); local run dir {cfg.results_dir}")
    from trainer.launch import LaunchError, launch

    try:
        summary = launch(cfg)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        m = summary["metrics"]
        print(f"[train] finished: step {m.get('step')}, ce {m.get('ce')}, mse {m.get('mse')}")
        print(f"[train] run dir {summary['results_dir']}; last checkpoint {summary['last_checkpoint']}")
        if summary["error"]:
            print(f"[train] error: {summary['error']}", file=sys.stderr)
        elif note:
            print(f"[train] note: {note}")
    return (2 if summary.get("user_error") else 1) if summary["error"] else 0


def preflight(cfg) -> tuple[list[str], object, object]:
    """Every check that can fail before a Ray worker starts, on the driver, all of them (first, alone: paths a
    submitted job cannot use, trainer.launch.submitted_job_problems): resources (GPUs
    when --use_gpu, the memory estimate per worker), the mixture against catalog and shards (the check
    jobs/plan.py runs: pipelines.mixture.sources.check_mixture), the training arguments, the eval: section
    and the resume source. Returns (problems, resume plan or None, mixture); pins the catalog the mixture
    found in `cfg.data.catalog`, so every worker reads the same one. torch is imported only by the checks that
    need it (GPUs, an eval: section, something to resume from), so a typo is reported in about a second."""
    from pipelines.mixture.config import MixtureConfigError
    from pipelines.mixture.sources import check_mixture
    from trainer.config import ConfigError, validate
    from trainer.data import generation_groups, load_mixture, mandatory_coverage
    from trainer.launch import submitted_job_problems

    misplaced = submitted_job_problems(cfg)
    if misplaced:   # under `ray job submit`: relative paths point into the job's throw-away folder, so the
        return misplaced, None, None   # shard checks would only report the consequence of that
    problems = _resource_problems(cfg)
    mixture = None
    if cfg.mixture_path:
        try:
            mixture = load_mixture(cfg.mixture_path).with_locations(cfg.data.catalog, cfg.data.shards)
        except MixtureConfigError as exc:
            problems += exc.problems
    mixture_ok = mixture is not None
    if mixture is not None:
        cfg.data.catalog = str(mixture.catalog)
        found = check_mixture(mixture)
        problems += found
        mixture_ok = not found
    try:
        validate(cfg, generation_groups(mixture) if mixture else None,
                 mandatory_coverage(mixture) if mixture else None)
    except ConfigError as exc:
        problems += exc.problems
    if mixture_ok and mixture.eval is not None:
        from trainer.evaluation import EvalConfigError, check_eval_section

        try:
            check_eval_section(cfg.mixture_path, cfg.data.catalog, cfg.data.shards)
        except (EvalConfigError, MixtureConfigError) as exc:
            problems.append(str(exc))
    plan = None
    if _may_resume(cfg):
        plan, problem = resume_plan(cfg)
        if problem:
            problems.append(problem)
    return problems, plan, mixture


def _may_resume(cfg) -> bool:
    """Whether the run has weights or a checkpoint to start from (else it starts fresh: nothing to check)."""
    t = cfg.train
    ckpts = cfg.checkpoint_dir
    return bool(cfg.model.model_path or t.resume_from or (t.auto_resume and ckpts.is_dir() and any(ckpts.iterdir())))


def resume_plan(cfg) -> tuple[object, str | None]:
    """(the resume plan, None) or (None, the one-line problem)."""
    from trainer.checkpoint.local import ResumeError, plan_resume_for
    from trainer.config import ConfigError

    try:
        return plan_resume_for(cfg), None
    except (ResumeError, ConfigError) as exc:
        return None, str(exc)


def _resource_problems(cfg) -> list[str]:
    """GPUs present when --use_gpu (on this machine, unless the run joins a cluster), and the memory
    planner's estimate per worker against the GPU's or this machine's memory (prints the estimate)."""
    import os

    problems = []
    joins_cluster = bool(cfg.run.address or os.environ.get("RAY_ADDRESS"))
    if cfg.run.use_gpu and not joins_cluster:
        import torch

        have = torch.cuda.device_count()
        if have == 0:
            problems.append("--use_gpu True but this machine has no GPU (torch sees no CUDA device): pass "
                            "--use_gpu False to train on the CPU (gloo + DDP), or run where GPUs are "
                            "(--address auto joins a running Ray cluster)")
            return problems
        if have < cfg.run.num_workers:
            problems.append(f"--use_gpu True asks for one GPU per worker, {cfg.run.num_workers} workers, but this "
                            f"machine has {have} GPU(s): pass --num_workers {have}")
    try:
        refusal = _memory_check(cfg)
    except Exception as exc:   # an estimate that cannot be made (bad model settings): validate names them
        refusal = None
        print(f"[train] note: no memory estimate ({type(exc).__name__}: {exc})")
    if refusal:
        problems.append(refusal)
    return problems


def _topology_note(plan, cfg) -> str:
    """What is guaranteed when a checkpoint resumes with another number of ranks or loader workers."""
    from trainer.checkpoint.reshard import saved_topology, topology_note

    if not plan.load_train_state or plan.source is None or not plan.source.is_dir():
        return ""
    old = saved_topology(plan.source)
    new = (cfg.run.num_workers, max(1, cfg.data.dataloader_workers))
    return topology_note(old, new) if old is not None and old != new else ""


def _memory_check(cfg) -> str | None:
    """Print the memory planner's estimate for this run; the refusal text when it does not fit: a GPU run
    against the visible GPU, a CPU run against this machine's available memory (None otherwise)."""
    from trainer.model_setup import cpu_memory_refusal, memory_line, memory_plan_for, memory_refusal

    if not cfg.run.use_gpu:
        return cpu_memory_refusal(cfg, print_fn=lambda line: print(f"[train] {line}"))
    plan = memory_plan_for(cfg)
    print(f"[train] {memory_line(cfg, plan)}")
    if not cfg.run.check_memory:
        return None
    import torch

    if not torch.cuda.is_available():
        print("[train] note: no GPU visible to this process: the estimate is not checked against GPU memory")
        return None
    props = torch.cuda.get_device_properties(0)
    return memory_refusal(cfg, plan, props.total_memory / 1024 ** 3, props.name)


if __name__ == "__main__":
    sys.exit(main())
