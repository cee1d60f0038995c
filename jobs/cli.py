"""The `medloom` command: `medloom <command> [options ...]` runs jobs/<command>.py's main with the options.

    medloom --help                      # the commands, one line each
    medloom ingest catalog/radiology.yaml --out shards
    medloom train --help                # a command's own options

A command is one line in COMMANDS: its name and the job module whose `main(argv) -> int` it runs (the
module's docstring gives the line `medloom --help` shows). Job modules are imported only when their command
runs, so `medloom --help` stays fast and imports neither torch nor Ray.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys

from jobs import running_as

COMMANDS: dict[str, str] = {
    "ingest": "jobs.ingest",
    "report": "jobs.report",
    "plan": "jobs.plan",
    "stream": "jobs.stream",
    "train": "jobs.train",
    "plot": "jobs.plot",
    "vqa": "jobs.vqa",
    "generate": "jobs.generate",
    "model-info": "jobs.model_info",
    "import-legacy": "jobs.import_legacy",
    "serve": "jobs.serve",
    "evaluate": "jobs.evaluate",
    "export": "jobs.export",
}


def summary(module: str) -> str:
    """First line of a job module's docstring, read from its source (the module is not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), spec.origin)) or ""
    return doc.strip().split("\n", 1)[0].strip()


def help_text() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: medloom <command> [options ...]", "",
             "MedLoom: data pipeline and Ray Train trainer for unified medical vision-language models.",
             "Each command runs the same code as `python jobs/<module>.py` with the same options.", "",
             "commands:"]
    lines += [f"  {name:<{width}}{summary(module)}" for name, module in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<{width}}show this message and exit",
              f"  {'--version':<{width}}print the installed medloom version", "",
              "`medloom <command> --help` shows a command's options."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medloom")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:   # `medloom ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv:
        print(help_text(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(help_text())
        return 0
    if name == "--version":
        print(f"medloom {_version()}")
        return 0
    if name not in COMMANDS:
        close = difflib.get_close_matches(name.lstrip("-"), list(COMMANDS), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        what = "option" if name.startswith("-") else "command"
        print(f"medloom: error: unknown {what} {name!r}{hint} (`medloom --help` lists the commands)",
              file=sys.stderr)
        return 2
    job = importlib.import_module(COMMANDS[name])
    with running_as(f"medloom {name}"):
        code = job.main(rest)
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
