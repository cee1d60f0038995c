"""Reading a checkpoint's optimizer and scheduler files (`*.pt`) as data, never as code; and checking that
its safetensors weights open, so an unreadable file is one line before any worker starts.

The trainer saves only tensors and plain values in them (trainer/parallel.py `optimizer_state_for_save`,
trainer/schedule.py `WarmupScheduler.state_dict`), so `torch.load(weights_only=True)` restores them exactly;
anything else in such a file (a pickled object whose loading would run code, a truncated or altered file) is
refused with one line naming the file and what to do.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


STATE_FILE_CONTENT = "tensors, numbers, strings, lists and dicts"


def load_state_file(path: Path, *, mmap: bool = False) -> Any:
    """A checkpoint's optimizer or scheduler file, read as data only: `torch.load(weights_only=True)` rebuilds
    tensors and plain values and refuses any other Python object, so a planted pickle payload never runs.
    Whatever does not load (altered, corrupt, truncated) is one `ResumeError` line naming the file."""
    try:
        if mmap and not zipfile.is_zipfile(path):   # mmap needs torch's zip format: read the old format whole
            mmap = False
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:   # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ResumeError(state_file_refusal(path, exc)) from None


def state_file_refusal(path: Path, exc: BaseException) -> str:
    """The one line for a .pt file that does not load as checkpoint data, with what to do."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        why = f"it holds a Python object ({found.group(1)}), not only {STATE_FILE_CONTENT}"
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        why = f"it does not load ({first[:160]})"
    return (f"{path}: refused: {why}; checkpoint files are read as data and never run code. Resume from "
            f"another checkpoint, or keep the weights and start a fresh optimizer and LR schedule with "
            f"--resume_model_optimizer False (or --resume_model_only True)")


PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that `torch.load(weights_only=True)` would refuse: what the
    trainer saves must come back as data (called before every optimizer / scheduler save)."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, PLAIN):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (int, float, bool, str, type(None))):
                raise TypeError(f"{where}: key {key!r} ({type(key).__name__}) would not load with weights_only")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} would not load with weights_only; "
                    f"save tensors and plain values only")


def check_weights_file(path: Path) -> None:
    """A safetensors file whose header does not open (truncated, not safetensors) is a `ResumeError`; the
    header check reads a few KB whatever the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:   # safetensors raises its own error type, OSError, ...
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ResumeError(f"{path}: refused: not a readable safetensors file ({first[:160]}); resume from "
                          f"another checkpoint") from None
