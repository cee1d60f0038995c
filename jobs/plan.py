#!/usr/bin/env python
"""Dry-run a mixture config from shard metadata only (no image decoding).

    python jobs/plan.py CONFIG [--catalog CAT] [--shards DIR] [--steps N] [--world-size W] [--num-workers K] [--json]

Prints, per group and per dataset, the realised share in samples and in tokens, the passes over each
dataset in N steps, the mean packing efficiency and the samples that can never fit. Exit status 2 for a
config, catalog, shard or usage error: one `error:` line per problem, all problems at once, no traceback
(the same preflight jobs/train.py runs before starting Ray: pipelines.mixture.sources.check_mixture).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from datasets_catalog.catalog import CatalogError
from jobs import prog
from pipelines.mixture.config import MixtureConfig, MixtureConfigError, add_location_flags, print_problems
from pipelines.mixture.dry_run import packing_from_config, plan_mixture


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/plan.py"),
        description="Simulate N training steps of a dataset mixture on every rank from shard metadata "
                    "(num_tokens) only, and report realised shares, passes, packing efficiency and samples "
                    "that can never fit. Packing settings come from the config's train: section unless given.",
        epilog="Example: python jobs/plan.py configs/radiology_sft.yaml --steps 200 --world-size 2 --json")
    p.add_argument("config", help="mixture config YAML (upstream dataset YAML, see docs/mixture.md)")
    add_location_flags(p)
    p.add_argument("--steps", type=int, help="packs per rank and loader worker to simulate (default 100; with "
                                              "stages: enough packs to reach the last stage's until_step)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: the config's train: num_workers, "
                                                  "else 1)")
    p.add_argument("--num-workers", type=int, help="loader workers per rank (default: the config's train: "
                                                   "dataloader_workers, else 1; 0 counts as 1)")
    p.add_argument("--seed", type=int, default=42, help="data seed when the config has no seed: (default 42)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--expected-num-tokens", type=int)
    p.add_argument("--max-num-tokens", type=int)
    p.add_argument("--max-num-tokens-per-sample", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object (stable keys, for scripts)")
    return p.parse_args(argv)


def _train_int(cfg: MixtureConfig, key: str, default: int) -> int:
    value = cfg.train.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MixtureConfigError(f"{cfg.path}: train: {key} must be a whole number >= 0, got {value!r}")
    return value


def format_report(r: dict) -> str:
    lines = [f"catalog {r['catalog']} ({r['catalog_from']}); shards {r['shards']}",
             f"mixture {r['config']}  ({r['steps']} steps x {r['world_size']} rank(s) x {r['num_workers']} "
             f"worker(s) = {r['packs']} packs, seed {r['seed']}, weights in {r['weight_unit']})",
             f"world size {r['world_size']} ({r['world_size_from']}), loader workers per rank "
             f"{r['num_workers']} ({r['num_workers_from']}), gradient accumulation "
             f"{r['gradient_accumulation_steps']}: {r['optimizer_steps']} optimizer steps",
             f"packing: expected {r['packing']['expected_num_tokens']}, max {r['packing']['max_num_tokens']}, "
             f"per sample {r['packing']['max_num_tokens_per_sample']} tokens", "",
             f"{'group':<58} {'weight':>7} {'samples':>8} {'tokens':>8}  mandatory"]
    for name, g in r["groups"].items():
        lines.append(f"{name:<58} {g['weight']:>7.1%} {g['sample_share']:>8.1%} {g['token_share']:>8.1%}  "
                     f"{'yes' if g['mandatory'] else ''}")
    lines += ["", f"{'dataset':<40} {'rows':>9} {'trained':>9} {'passes':>8}"]
    for name, d in r["datasets"].items():
        lines.append(f"{name:<40} {d['rows']:>9} {d['samples']:>9} {d['passes']:>8.2f}")
    nf = r["never_fit"]
    lines += ["", f"mean packing efficiency: {r['packing_efficiency']:.1%} "
                  f"({r['mean_tokens_per_pack']:.0f} tokens per pack)",
              f"samples that can never fit (> {r['packing']['max_num_tokens_per_sample']} tokens): {nf['count']}"
              + (f" {nf['by_dataset']}" if nf["count"] else "")
              + (f", e.g. {', '.join(nf['sample_ids'][:5])}" if nf["sample_ids"] else "")]
    for st in r.get("stages", []):
        lines += ["", f"stage {st['name']}: steps {st['start_step']}..{st['until_step'] - 1} "
                      f"({st['samples']} samples simulated)",
                  f"  {'group':<56} {'weight':>7} {'samples':>8} {'tokens':>8}"]
        for name, g in st["groups"].items():
            lines.append(f"  {name:<56} {g['weight']:>7.1%} {g['sample_share']:>8.1%} {g['token_share']:>8.1%}")
    lines += ([""] if r.get("stages") and r["notes"] else []) + [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)   # notes are part of the report (no-op where logging is set up)
    args = parse_args(argv)
    if any(v is not None and v < 1 for v in (args.steps, args.world_size, args.num_workers)):
        print("error: --steps, --world-size and --num-workers must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = MixtureConfig.from_yaml(args.config).with_locations(args.catalog, args.shards)
        world_size = args.world_size or max(1, _train_int(cfg, "num_workers", 1))
        num_workers = args.num_workers or max(1, _train_int(cfg, "dataloader_workers", 1))
        grad_accum = max(1, _train_int(cfg, "gradient_accumulation_steps", 1))
        steps = args.steps
        if steps is None:
            steps = -(-cfg.stages[-1].until_step * grad_accum // num_workers) if cfg.stages else 100
        packing = packing_from_config(cfg, expected_num_tokens=args.expected_num_tokens,
                                      max_num_tokens=args.max_num_tokens,
                                      max_num_tokens_per_sample=args.max_num_tokens_per_sample)
        report = plan_mixture(cfg, packing, steps, world_size, num_workers, args.seed, args.epoch, grad_accum)
        report["catalog_from"] = cfg.catalog_from
        for key, arg, train_key in (("world_size", args.world_size, "num_workers"),
                                    ("num_workers", args.num_workers, "dataloader_workers")):
            report[f"{key}_from"] = ("--" + key.replace("_", "-") if arg is not None else
                                     f"train: {train_key}" if train_key in cfg.train else "default")
    except (MixtureConfigError, CatalogError, ValueError) as exc:
        print_problems(exc)
        return 2
    print(json.dumps(report, sort_keys=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
