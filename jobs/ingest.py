#!/usr/bin/env python
"""Ingest a dataset catalog into validated Parquet shards (Ray Data).

    python jobs/ingest.py catalog/radiology.yaml [--out DIR] [--only NAME,...] [--force]
                          [--reference-images] [--store-pixels] [--address ADDR] [--verify-images]
                          [--fast-check] [--json]

Exit status: 0 when every dataset is built or up to date, 1 when a dataset failed (more rejected rows than its
max_reject_fraction, or it could not be published; the summary names it, the others are published), 2 for a
catalog or usage error (one message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from datasets_catalog.catalog import CatalogError, load_catalog
from jobs import prog
from pipelines.ingest.driver import IngestError, format_summary, run_ingest
from pipelines.ingest.ray_session import job_path_problem
from pipelines.imaging.medical import with_keep_dicom_tags
from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.report.ingest_checks import register_ingest_checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("jobs/ingest.py"),
        description="Validate the datasets of a catalog and write them as Parquet shards: "
                    "DIR/<dataset>/part-NNNNN.parquet, _rejects.parquet and _manifest.json. "
                    "Unchanged datasets are skipped.",
        epilog="Example: python jobs/ingest.py catalog/radiology.yaml --only chest_xray_vqa --force",
    )
    parser.add_argument("catalog", help="catalog YAML file (see docs/ingest.md)")
    parser.add_argument("--out", metavar="DIR", help="output folder or object-storage URI, e.g. "
                                                     "s3://bucket/prefix (see docs/cluster.md; default: the "
                                                     "catalog's output_dir, else <project root>/shards)")
    parser.add_argument("--only", metavar="NAME,...", help="comma-separated dataset names to ingest")
    parser.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    parser.add_argument("--reference-images", action="store_true",
                        help="store image paths only (bytes column null); readers resolve them via data_dir")
    parser.add_argument("--store-pixels", action="store_true",
                        help="also store each image decoded and resized to its VAE and ViT targets (raw RGB), so "
                             "the training loader skips decoding and resizing: several times faster packing, "
                             "about width x height x 3 bytes more per target on disk. Same as store_pixels: "
                             "true in the catalog (per dataset or top level)")
    parser.add_argument("--address", metavar="ADDR",
                        help="join a Ray cluster ('auto': the one `ray start` started on this machine, or "
                             "host:port; RAY_ADDRESS works too, and `ray job submit` sets it). Default: a local "
                             "Ray of this run's own, also when a cluster runs on the machine (docs/cluster.md)")
    parser.add_argument("--verify-images", action="store_true",
                        help="also decode every image fully (slow) to catch corruption inside the pixel data")
    parser.add_argument("--keep-dicom-tags", metavar="KEYWORD,...", default="",
                        help="DICOM keywords to copy into each image's meta (an allow-list; by default only "
                             "technical fields are kept, never patient or institution data)")
    parser.add_argument("--fast-check", action="store_true",
                        help="decide that a dataset is up to date from its JSONL's size and mtime instead of "
                             "hashing the JSONL (for huge sources; misses an edit that keeps both). Shards are "
                             "still checked against the manifest")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_medical_imaging()   # DICOM / NIfTI: catalog options, probing, reject reasons
    register_ingest_checks()     # train/val leakage warnings under the summary
    try:
        catalog = load_catalog(args.catalog)
        if args.keep_dicom_tags:
            try:
                catalog = with_keep_dicom_tags(catalog, args.keep_dicom_tags.split(","))
            except ValueError as exc:
                raise CatalogError(f"--keep-dicom-tags: {exc}") from None
        if args.store_pixels:
            catalog = catalog.with_store_pixels()
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        problem = job_path_problem(args.out if args.out else catalog.output_dir,
                                   "--out" if args.out else f"the catalog's output_dir ({args.catalog})")
        if problem:
            raise IngestError(problem if args.out else problem + " with --out")
        report = run_ingest(catalog, out=args.out, only=only, force=args.force,
                            reference_images=args.reference_images, address=args.address,
                            verify_images=args.verify_images, progress=not args.quiet,
                            fast_check=args.fast_check)
    except (CatalogError, IngestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partially built dataset was published", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    else:
        print(format_summary(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
