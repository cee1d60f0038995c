"""Load a checkpoint directory for inference, with user-facing errors (docs/upstream-compat.md#checkpoint-loading, #text-generation).

Any directory the trainer writes (`{step:07d}/`) or a released UniMedVL / BAGEL directory works. Before
anything heavy is built, `check_checkpoint_dir` names each missing file and what the directory must contain,
so a wrong `--model_path` costs one clear line instead of a traceback. A trainer checkpoint (told apart from
a released directory by its training files: train_state.json, the per-rank stream states)
must carry `COMPLETE.json`, the marker the trainer writes last (trainer/checkpoint/local.py); without it the
save did not finish and its files may not belong together. Falling back from ema.safetensors to the live
weights prints one note.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets_catalog.tokenizer import TextTokenizer
from model.checkpoint import VAE_FILES, CheckpointError, load_model_from_dir
from model.config import ConfigError
from model.unified import UnifiedModel

from .defaults import DefaultsError, InferenceDefaults, read_defaults

WEIGHT_FILES = ("ema.safetensors", "model.safetensors")
COMPONENT_FILES = ("language_model.safetensors",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "medloom_tokenizer.json")
MUST_CONTAIN = ("a checkpoint directory must contain llm_config.json, vit_config.json, ema.safetensors "
                "(or model.safetensors), ae.safetensors (for image generation) and the tokenizer files "
                "(tokenizer.json or vocab.json + merges.txt)")


MARKER = "COMPLETE.json"    # written last by the trainer (trainer/checkpoint/local.py)
# files only a MedLoom trainer checkpoint has (an upstream training directory has data_status.pt instead)
TRAINING_FILES = ("train_state.json", "stream_state.*-of-*.json")


class InferenceError(ValueError):
    """A user mistake (bad checkpoint directory, unreadable image, prompt too long); one clear message."""


def note(text: str) -> None:
    """One `note:` line on stderr (what inference chose for the user, e.g. live weights instead of EMA)."""
    print(f"note: {text}", file=sys.stderr)


def is_trainer_checkpoint(path: Path) -> bool:
    """A directory the trainer wrote (it has training-state files); a released directory has none."""
    return any(next(path.glob(pattern), None) is not None for pattern in TRAINING_FILES)


def check_complete(path: Path) -> None:
    """A trainer checkpoint without its COMPLETE.json marker is refused, naming a complete sibling if any."""
    if not is_trainer_checkpoint(path) or (path / MARKER).is_file():
        return
    siblings = sorted((p for p in path.parent.iterdir() if p.is_dir() and p.name.isdigit() and p != path
                       and (p / MARKER).is_file()), key=lambda p: int(p.name)) if path.parent.is_dir() else []
    hint = f", e.g. {siblings[-1]}" if siblings else ""
    raise InferenceError(f"--model_path {path}: a trainer checkpoint without {MARKER}: its save did not finish "
                         f"(or it was copied in part), so its files may not belong together; use a complete "
                         f"checkpoint{hint}")


def check_checkpoint_dir(path: str | Path, need_vae: bool) -> Path:
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"--model_path {path}: no such directory ({MUST_CONTAIN})")
    if not path.is_dir():
        raise InferenceError(f"--model_path {path}: is a file, not a checkpoint directory ({MUST_CONTAIN})")
    check_complete(path)
    missing = [name for name in ("llm_config.json", "vit_config.json") if not (path / name).is_file()]
    if not any((path / n).is_file() for n in WEIGHT_FILES + COMPONENT_FILES):
        missing.append("ema.safetensors (or model.safetensors)")
    if need_vae and not any((path / n).is_file() for n in VAE_FILES):
        from safetensors import safe_open

        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        in_weights = False
        if weights is not None:
            try:
                with safe_open(str(weights), framework="pt") as fh:
                    in_weights = any(k.startswith("vae_model.") for k in fh.keys())
            except Exception as exc:  # safetensors raises several types for corrupt files
                raise InferenceError(f"{weights}: not a readable safetensors file ({exc})") from None
        if not in_weights:
            missing.append("ae.safetensors (the FLUX VAE, needed for image generation)")
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    if missing:
        raise InferenceError(f"{path}: missing {', '.join(missing)}; {MUST_CONTAIN}")
    return path


def pick_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU (an explicit choice wins)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU, unless given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise InferenceError(f"--dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


@dataclass
class Loaded:
    model: UnifiedModel
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    path: Path
    defaults: InferenceDefaults = field(default_factory=InferenceDefaults)   # transforms it was trained at


def weights_note(path: Path, use_ema: bool) -> str | None:
    """The note when the requested weights file is missing and the other one is used."""
    want, other = WEIGHT_FILES if use_ema else WEIGHT_FILES[::-1]
    if (path / want).is_file() or not (path / other).is_file():
        return None
    if use_ema:
        return f"{path} has no {want}: using the live weights {other} (not the EMA)"
    return f"{path} has no {want}: using the EMA weights {other}"


def load_for_inference(model_path: str | Path, visual_gen: bool, device=None, dtype=None,
                       use_ema: bool = True) -> Loaded:
    """Model in eval mode on `device` in `dtype` (VAE included, as upstream casts it), plus its tokenizer.

    VQA loads with visual_gen=False (no VAE, docs/upstream-compat.md#checkpoint-loading); generation needs the VAE."""
    from model.adapters import AdapterError, is_adapter_dir, load_adapted_model, read_base_reference

    adapter = Path(model_path) if is_adapter_dir(model_path) else None
    if adapter is not None:   # a LoRA checkpoint: its base (checked by sha256) with the adapter merged in
        check_complete(adapter)
        try:
            check_checkpoint_dir(read_base_reference(adapter)["path"], need_vae=visual_gen)
        except AdapterError as exc:
            raise InferenceError(str(exc)) from None
    path = adapter if adapter is not None else check_checkpoint_dir(model_path, need_vae=visual_gen)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        defaults = read_defaults(path)
    except DefaultsError as exc:
        raise InferenceError(str(exc)) from None
    try:
        tokenizer = TextTokenizer.from_dir(path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise InferenceError(f"{path}: cannot load the tokenizer: {exc}") from None
    try:
        # built and cast on the CPU, then moved: the GPU only ever holds the bf16 copy of a 7B model
        if adapter is not None:
            model = load_adapted_model(adapter, use_ema=use_ema, device="cpu", dtype=dt, visual_gen=visual_gen,
                                       tokenizer=tokenizer)
        else:
            model = load_model_from_dir(path, use_ema=use_ema, device="cpu", dtype=dt, visual_gen=visual_gen,
                                        tokenizer=tokenizer)
    except AdapterError as exc:
        raise InferenceError(str(exc)) from None
    except (CheckpointError, ConfigError) as exc:
        raise InferenceError(f"{exc}; {MUST_CONTAIN}") from None
    if adapter is None:
        fallback = weights_note(path, use_ema)
        if fallback:
            note(fallback)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(model, tokenizer, dev, dt, path, defaults)
