"""Dataset quality report over a shards folder (one self-contained HTML page).
    python jobs/report.py SHARDS_DIR [--out report.html] [--strict]

Writes one self-contained HTML page (plots embedded as PNG) with rows per dataset and modality, reject
reasons, image size / aspect / token / text-length distributions, thumbnails decoded as the trainer sees
them, and duplicate images by content hash with train/validation leakage listed first.
Exit codes: 0 ok, 1 leakage found with --strict, 2 usage error (e.g. no such folder) or a missing or
unreadable shard file (one `error:` line naming it and the ingest command that rebuilds it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs import prog
from pipelines.report.quality import write_report
from pipelines.storage.shard_reader import ShardReadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/report.py"), description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python jobs/report.py shards --out shards/report.html --strict",
    )
    p.add_argument("shards_dir", type=Path, help="folder written by jobs/ingest.py (one subfolder per dataset)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: SHARDS_DIR/report.html)")
    p.add_argument("--strict", action="store_true", help="exit 1 when an image is shared by a train and a "
                                                          "validation/test dataset (naming both rows)")
    p.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    p.add_argument("--thumbnails", type=int, default=8, help="random samples shown per dataset (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the thumbnail draw")
    p.add_argument("--json", action="store_true", help="print the machine-readable summary instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.shards_dir.is_dir():
        print(f"error: shards folder {args.shards_dir} does not exist; run jobs/ingest.py first or check the path",
              file=sys.stderr)
        return 2
    out = args.out or (args.shards_dir / "report.html")
    only = [n for n in args.only.split(",") if n] or None
    try:
        report = write_report(args.shards_dir, out, seed=args.seed, thumbnails=max(0, args.thumbnails), only=only)
    except ShardReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**report.summary(), "report": str(out)}, indent=2))
    else:
        for name, s in report.scan.datasets.items():
            print(f"{name:<28} split={s.split or '?':<6} rows={s.rows:<7} images={s.images:<7} "
                  f"rejected={sum(s.rejects.values())}")
        kinds = report.summary()["duplicate_groups"]
        print(f"duplicate image groups: {kinds['cross_dataset']} across datasets, "
              f"{kinds['within_dataset']} within a dataset, {kinds['leakage']} train/val leakage")
        for pair in report.leakage:
            print(f"LEAKAGE: {pair.describe()}")
        print(f"report: {out}")
    if args.strict and report.leakage:
        print(f"error: {len(report.leakage)} train/validation leakage pair(s) found (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
