#!/usr/bin/env python
"""Train a BAGEL/UniMedVL-compatible model on Ray Train from the mixture's shards.

    python jobs/train.py --config configs/radiology_sft.yaml --model tiny --total_steps 30
    ray job submit --working-dir . -- python jobs/train.py --config configs/radiology_sft.yaml

Arguments keep the upstream names (see --help and docs/training.md).
"""
from __future__ import annotations

import json
import sys

from jobs import prog


def main(argv: list[str] | None = None) -> int:
    from trainer.checkpoint.local import ResumeError, plan_resume_for
    from trainer.config import ConfigError, help_text, load_config, resolve_paths, validate

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text().replace("python jobs/train.py", prog("python jobs/train.py"), 1))
        return 0 if argv else 2
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    from pipelines.mixture.config import MixtureConfigError
    from trainer.evaluation import EvalConfigError, check_eval_section
    try:
        cfg = resolve_paths(load_config(argv))
        from trainer.data import generation_groups, load_mixture, mandatory_coverage

        mixture = load_mixture(cfg.mixture_path) if cfg.mixture_path else None
        gen = generation_groups(mixture) if mixture else None
        cover = mandatory_coverage(mixture) if mixture else None
        validate(cfg, gen, cover)
        if cfg.mixture_path:
            check_eval_section(cfg.mixture_path)
        plan = plan_resume_for(cfg)
    except (ConfigError, MixtureConfigError, ResumeError, EvalConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[train] run {cfg.run_name}: {cfg.run.num_workers} worker(s), "
          f"{'GPU' if cfg.run.use_gpu else 'CPU'}, {cfg.train.total_steps} steps; start: {plan.reason}")
    note = _topology_note(plan, cfg)
    if note:
        print(f"[train] note: {note}")
    refusal = _memory_check(cfg)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
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


def _topology_note(plan, cfg) -> str:
    """What is guaranteed when a checkpoint resumes with another number of ranks or loader workers."""
    from trainer.checkpoint.reshard import saved_topology, topology_note

    if not plan.load_train_state or plan.source is None or not plan.source.is_dir():
        return ""
    old = saved_topology(plan.source)
    new = (cfg.run.num_workers, max(1, cfg.data.dataloader_workers))
    return topology_note(old, new) if old is not None and old != new else ""


def _memory_check(cfg) -> str | None:
    """Print the memory planner's estimate for this run; on a GPU run with a visible GPU, the refusal text
    when the estimate does not fit it (None otherwise)."""
    from trainer.model_setup import memory_line, memory_plan_for, memory_refusal

    plan = memory_plan_for(cfg)
    print(f"[train] {memory_line(cfg, plan)}")
    if not (cfg.run.use_gpu and cfg.run.check_memory):
        return None
    import torch

    if not torch.cuda.is_available():
        print("[train] note: no GPU visible to this process: the estimate is not checked against GPU memory")
        return None
    props = torch.cuda.get_device_properties(0)
    return memory_refusal(cfg, plan, props.total_memory / 1024 ** 3, props.name)


if __name__ == "__main__":
    sys.exit(main())
