#!/usr/bin/env python
"""Print the sample ids of the next N packed sequences one rank would train on (metadata only).

    python jobs/stream.py CONFIG [--catalog CAT] [--shards DIR] --rank R --world-size W [--take N] [--state-in F ...]
                          [--state-out F] [--json]

For debugging determinism and resume: `--state-out` saves the stream's position after the N packs, and
`--state-in` continues from it (give the states of all ranks of an earlier run to continue with another
world size). Exit status 2 for a config, shard, state or usage error (one `error:` line per problem, no
traceback). A catalog chosen by --catalog or by the catalog/*.yaml search is named on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from datasets_catalog.catalog import CatalogError
from jobs import prog
from pipelines.mixture.stream import MixtureStream, StreamStateError
from pipelines.mixture.config import MixtureConfig, MixtureConfigError, add_location_flags, print_problems
from pipelines.mixture.dry_run import packing_from_config, tokenizer_for
from pipelines.mixture.sources import resolve_sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/stream.py"),
        description="Print the sample ids of the next N packs a rank (and loader worker) would train on, "
                    "decided from shard metadata exactly as training decides them.",
        epilog="Example: python jobs/stream.py configs/radiology_sft.yaml --rank 0 --world-size 2 --take 5 "
               "--state-out /tmp/r0.json; then --state-in /tmp/r0.json continues. To change the world size, "
               "pass every old rank's state: --state-in /tmp/r0.json /tmp/r1.json")
    p.add_argument("config", help="mixture config YAML (see docs/mixture.md)")
    add_location_flags(p)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--worker-id", type=int, default=0, help="loader worker of this rank (default 0)")
    p.add_argument("--num-workers", type=int, default=1, help="loader workers per rank (default 1)")
    p.add_argument("--take", type=int, default=10, help="number of packs to print (default 10)")
    p.add_argument("--seed", type=int, default=42, help="data seed when the config has no seed: (default 42)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--state-in", nargs="+", metavar="F",
                   help="state JSON to resume from: this stream's own, or the states of all streams of an "
                        "earlier run (several files, or one file holding a list)")
    p.add_argument("--state-out", metavar="F", help="write the state after the last printed pack here")
    p.add_argument("--json", action="store_true", help="one JSON object per pack per line (stable keys)")
    return p.parse_args(argv)


def _read_states(paths: list[str]):
    states = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise StreamStateError(f"{path}: cannot read a state JSON ({exc})") from None
        states.extend(data if isinstance(data, list) else [data])
    return states[0] if len(states) == 1 else states


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)   # no-op where logging is set up already
    args = parse_args(argv)
    try:
        cfg = MixtureConfig.from_yaml(args.config).with_locations(args.catalog, args.shards)
        resolved = resolve_sources(cfg)
        if cfg.catalog_from != "catalog: key":
            print(f"catalog {resolved.catalog.path} ({cfg.catalog_from})", file=sys.stderr)
        grad_accum = cfg.train.get("gradient_accumulation_steps", 1)
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise MixtureConfigError(f"{args.config}: train: gradient_accumulation_steps must be a whole number "
                                     f">= 1, got {grad_accum!r}")
        stream = MixtureStream(cfg, packing_from_config(cfg), tokenizer_for(resolved), rank=args.rank,
                               world_size=args.world_size, worker_id=args.worker_id, num_workers=args.num_workers,
                               seed=args.seed, epoch=args.epoch, resolved=resolved, grad_accum=grad_accum)
        if args.state_in:
            stream.load_state_dict(_read_states(args.state_in))
        for _ in range(args.take):
            plan = stream.next_plan()
            record = {"rank": args.rank, "worker": args.worker_id, "index": plan.metrics["pack_index"],
                      "samples": [m.sample.sample_id for m in plan.members], "tokens": plan.tokens,
                      "groups": plan.metrics["samples_per_group"],
                      "packing_efficiency": round(plan.metrics["packing_efficiency"], 6),
                      "skipped_too_long": plan.metrics["skipped_too_long_ids"]}
            stage = ""
            if cfg.stages:   # curriculum: the optimizer step this pack feeds and its stage
                record.update(step=plan.metrics["step"], stage=cfg.stages[plan.metrics["stage"]].name)
                stage = f" step {record['step']:>5} stage {record['stage']}"
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"rank {args.rank} pack {record['index']:>5}{stage}: {plan.tokens:>6} tokens  "
                      f"{' '.join(record['samples'])}", flush=True)
        if args.state_out:
            tmp = f"{args.state_out}.tmp.{os.getpid()}"
            Path(tmp).write_text(json.dumps(stream.state_dict()))
            os.replace(tmp, args.state_out)
    except (MixtureConfigError, CatalogError, StreamStateError, ValueError) as exc:
        print_problems(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
