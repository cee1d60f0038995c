#!/usr/bin/env python
"""Merge a LoRA checkpoint's adapter into its base weights and write a full checkpoint directory.

    python jobs/export.py --model_path runs/mix/checkpoints/0000200 --out merged/ [--use_ema False]

The adapter checkpoint names its base (base_model.json: path, weights file, sha256; the sha256 is checked).
The output is a UniMedVL-layout directory (model.safetensors and ema.safetensors holding the merged
weights, ae.safetensors, llm/vit configs, tokenizer) that vqa.py, generate.py and --model_path fine-tuning
load like any other. Exit status 2 for a user mistake (one message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs import prog, true_or_false


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/export.py"),
        description="Merge a LoRA adapter checkpoint (--finetuning_type lora) into its base checkpoint and write "
                    "a full checkpoint directory.",
        epilog="Example: python jobs/export.py --model_path runs/mix/checkpoints/0000200 --out merged")
    p.add_argument("--model_path", required=True, help="the adapter checkpoint (adapter_model.safetensors, "
                                                       "adapter_config.json, base_model.json)")
    p.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    p.add_argument("--use_ema", type=true_or_false, nargs="?", const=True, default=True, metavar="BOOL",
                   help="merge the EMA adapter (default True) or the raw adapter (False)")
    p.add_argument("--base_path", default=None, help="the base checkpoint, if it moved since training "
                                                     "(default: the path in base_model.json; sha256 checked)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from model.adapters import AdapterError, export_merged
    from model.checkpoint import CheckpointError
    from model.config import ConfigError

    try:
        info = export_merged(args.model_path, args.out, use_ema=args.use_ema, base_dir=args.base_path)
    except (AdapterError, CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        print(f"merged {info['adapter_weights']} of {args.model_path} into {info['base']['path']}/"
              f"{info['base']['weights_file']}: {info['parameters']:,} parameters")
        print(f"wrote {info['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
