"""The jobs: one module per `medloom <command>` (the table is in jobs/cli.py), each also runnable as a script
(`python jobs/<name>.py ...`, `ray job submit --working-dir . -- python jobs/train.py ...`).

A job module keeps the shape: imports at the top, `main(argv: list[str] | None = None) -> int` that returns the
exit status, and `if __name__ == "__main__": sys.exit(main())` at the end. Its argument parser names itself
with `prog("jobs/<name>.py")`, so its usage line reads `medloom <command>` when the medloom command runs it.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

_command: str | None = None     # "medloom ingest" while jobs.cli runs that sub-command


def prog(script: str) -> str:
    """The program name a job's usage line shows: `medloom <command>` under the medloom command, else `script`."""
    return _command or script


@contextmanager
def running_as(command: str) -> Iterator[None]:
    """While jobs.cli runs a job's main: its usage and errors say `command` (e.g. "medloom ingest")."""
    global _command
    previous, _command = _command, command
    try:
        yield
    finally:
        _command = previous


def true_or_false(text: str) -> bool:
    """argparse type of the upstream-style `--flag True|False` options (1/0 and yes/no too)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_model_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" option group every inference job shares (device, dtype, which weights); callers add their
    transform flags to the group it returns."""
    group = parser.add_argument_group("model")
    group.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when present)")
    group.add_argument("--dtype", help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    group.add_argument("--use_model_weights", action="store_true",
                       help="model.safetensors instead of ema.safetensors")
    return group
