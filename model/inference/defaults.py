"""What inference takes from a checkpoint when no flag says otherwise: the image transforms it was trained at.

A model trained at small resize targets (the tiny demo: VAE 64 px, ViT 56 px) answers gibberish, slowly, at the
upstream 1024 / 980 px inference transforms, so a trainer checkpoint records, in its `training_args.json`
under `"inference"`, the transforms its datasets were trained with, per role:

- `vit_transform`: ViT transform of the understanding datasets (VQA / report: `sft`, `vlm_sft`; else any dataset
  shown through the ViT), the default of jobs/vqa.py and `VQAInferencer`;
- `gen_vae_transform`, `gen_vit_transform`: VAE and ViT transforms of the generation datasets (`t2i`, `edit`,
  ...), the defaults of jobs/generate.py and `ImageGenerator`.

When datasets of one role were trained at several transforms, the one most of them used is the default (the
first listed on a tie) and a note says so. A released UniMedVL / BAGEL directory has no `training_args.json`:
it keeps UniMedVL's inference defaults (docs/upstream-compat.md#image-generation). The tokenizer needs no
record: it is the checkpoint's own tokenizer files. Explicit flags / arguments always win.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from datasets_catalog.task_kinds import TaskKind
from datasets_catalog.transforms import ImageTransformArgs

from .interleave import UMV_GEN_VAE_ARGS, UMV_GEN_VIT_ARGS, VQA_VIT_ARGS

TRAINING_ARGS_FILE = "training_args.json"
RECORD_KEY = "inference"
ROLES = {"vit_transform": ("--vit_transform", "ViT", VQA_VIT_ARGS),
         "gen_vae_transform": ("--vae_transform", "VAE", UMV_GEN_VAE_ARGS),
         "gen_vit_transform": ("--vit_transform", "ViT", UMV_GEN_VIT_ARGS)}


@dataclass(frozen=True)
class TrainedTransforms:
    """One dataset of the training mixture with the transforms it was trained at."""
    name: str
    task: TaskKind
    vae: ImageTransformArgs
    vit: ImageTransformArgs


@dataclass(frozen=True)
class InferenceDefaults:
    vit_transform: ImageTransformArgs = VQA_VIT_ARGS           # VQA / understanding
    gen_vae_transform: ImageTransformArgs = UMV_GEN_VAE_ARGS   # generation and editing
    gen_vit_transform: ImageTransformArgs = UMV_GEN_VIT_ARGS
    origin: str = "upstream defaults"                         # or "<dir>/training_args.json"
    notes: tuple[tuple[str, str], ...] = ()                   # (role, text): datasets of a role disagreed

    def notes_for(self, *roles: str) -> list[str]:
        return list(dict.fromkeys(text for role, text in self.notes if role in roles))


def _text(t: ImageTransformArgs) -> str:
    return f"{t.max_image_size},{t.min_image_size},{t.image_stride},{t.max_pixels}"


def _pick(role: str, candidates: list[tuple[str, ImageTransformArgs]], notes: dict[str, str]) -> Optional[dict]:
    """The transform most of these datasets used (first on a tie), with a note when they disagree."""
    if not candidates:
        return None
    counts = Counter(t for _, t in candidates)
    chosen, n = counts.most_common(1)[0]
    if len(counts) > 1:
        flag, kind, _ = ROLES[role]
        others = ", ".join(f"{_text(t)} ({c})" for t, c in counts.items() if t != chosen)
        notes[role] = (f"the datasets were trained at {len(counts)} {kind} transforms; the default is "
                       f"{_text(chosen)} ({n} of {len(candidates)} datasets), others: {others}; pass {flag} to "
                       f"choose")
    return asdict(chosen)


def record_for(datasets: Sequence[TrainedTransforms]) -> dict[str, Any]:
    """The `"inference"` record of training_args.json for a mixture's datasets (module docstring)."""
    notes: dict[str, str] = {}
    understanding = [(d.name, d.vit) for d in datasets if d.task.vit_context and not d.task.generation] \
        or [(d.name, d.vit) for d in datasets if d.task.vit_context]
    generation = [d for d in datasets if d.task.generation]
    gen_vit = [(d.name, d.vit) for d in generation if d.task.vit_context] or understanding
    return {
        "vit_transform": _pick("vit_transform", understanding, notes),
        "gen_vae_transform": _pick("gen_vae_transform", [(d.name, d.vae) for d in generation], notes),
        "gen_vit_transform": _pick("gen_vit_transform", gen_vit, notes),
        "datasets": {d.name: {"task": d.task.name, "image_transform_args": asdict(d.vae),
                              "vit_image_transform_args": asdict(d.vit)} for d in datasets},
        "notes": notes,
    }


class DefaultsError(ValueError):
    """training_args.json exists but cannot be read; the message names the file."""


def read_defaults(model_path: str | Path) -> InferenceDefaults:
    """The defaults of this checkpoint directory: its recorded transforms, else UniMedVL's."""
    path = Path(model_path) / TRAINING_ARGS_FILE
    if not path.is_file():
        return InferenceDefaults()          # a released directory: upstream defaults
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DefaultsError(f"{path}: not readable JSON ({exc}); restore the file, or delete it to use the "
                            f"upstream inference defaults") from None
    record = args.get(RECORD_KEY) if isinstance(args, dict) else None
    if not isinstance(record, dict):
        note = (f"{path} records no image transforms (a checkpoint of an older version): using the upstream "
                f"defaults; pass --vit_transform / --vae_transform as trained")
        return InferenceDefaults(notes=tuple((role, note) for role in ROLES))
    values: dict[str, ImageTransformArgs] = {}
    for role, (_, _, upstream) in ROLES.items():
        raw = record.get(role)
        try:
            values[role] = upstream if raw is None else ImageTransformArgs.from_mapping(raw, upstream)
        except (TypeError, ValueError) as exc:
            raise DefaultsError(f"{path}: inference.{role}: {exc}; fix or delete the record") from None
    raw_notes = record.get("notes")
    notes = tuple((str(k), str(v)) for k, v in raw_notes.items()) if isinstance(raw_notes, dict) else ()
    return InferenceDefaults(**values, origin=str(path), notes=notes)
