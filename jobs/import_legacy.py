#!/usr/bin/env python
"""Turn an upstream UniMedVL/BAGEL `dataset_info.py` (DATASET_INFO dict) into a MedLoom catalog manifest.

    python jobs/import_legacy.py path/to/dataset_info.py [path/to/config.yaml] [--out catalog/mine.yaml]

The Python file is parsed with `ast`, never executed. With the training YAML, only the datasets it names are
imported, with the transform args of their group. Splits are inferred from `_train` / `_val` / `_test` name
suffixes; every entry that is not imported is named with the way to bring it (docs/ingest.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets_catalog.catalog import CatalogError, parse_catalog
from datasets_catalog.legacy import LegacyError, convert, to_yaml
from datasets_catalog.tokenizer import BUILTIN_SPECS
from jobs import prog
from pipelines.storage.uris import write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("jobs/import_legacy.py"), description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_info", help="upstream data/dataset_info.py (read as data, never executed)")
    parser.add_argument("config", nargs="?", help="optional upstream training YAML (dataset_names, transforms)")
    parser.add_argument("--out", metavar="FILE", help="write the catalog here (default: print it)")
    parser.add_argument("--base", metavar="DIR", default=".",
                        help="folder that relative paths in DATASET_INFO are relative to (default: current folder)")
    parser.add_argument("--task-map", metavar="KEY=KIND", action="append", default=[],
                        help="task kind for a registry key whose class is not known, e.g. my_sft=sft")
    parser.add_argument("--tokenizer", metavar="builtin|DIR",
                        help="the catalog's tokenizer: 'builtin' or a folder with Qwen2 tokenizer files (e.g. the "
                             "released checkpoint's folder); relative to the current folder")
    return parser.parse_args(argv)


def _tokenizer(value: str | None) -> str | None:
    """'builtin' as is, a folder as an absolute path (the catalog may be written elsewhere)."""
    if value is None or value in BUILTIN_SPECS:
        return value
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise LegacyError(f"--tokenizer {value}: folder not found ({folder}); give 'builtin' or a folder with "
                          f"Qwen2 tokenizer files")
    return str(folder)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LegacyError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source = _read_text(args.dataset_info)
        config = _read_text(args.config) if args.config else None
        task_map = {}
        for item in args.task_map:
            if "=" not in item:
                raise LegacyError(f"--task-map {item!r}: use KEY=KIND, e.g. my_sft=sft")
            key, kind = item.split("=", 1)
            task_map[key.strip()] = kind.strip()
        result = convert(source, config, base=Path(args.base).resolve(), task_map=task_map,
                         filename=args.dataset_info, tokenizer=_tokenizer(args.tokenizer))
        text = to_yaml(result, args.dataset_info)
        out = Path(args.out) if args.out else None
        try:   # paths are checked so the user hears about missing files now, not at ingest time
            parse_catalog(text, out or Path.cwd() / "imported.yaml")
        except CatalogError as exc:
            print(f"warning: the catalog does not validate on this machine yet: {exc}", file=sys.stderr)
    except (OSError, LegacyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for note in [*result.notes, *result.warnings]:
        print(f"note: {note}", file=sys.stderr)
    if out:
        write_text_atomic(out, text)
        print(f"wrote {out} ({len(result.catalog['datasets'])} datasets)", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
