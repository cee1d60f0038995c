"""Task kinds: the UniMedVL / BAGEL dataset classes, their aliases and the fields each one needs.

One `TaskKind` per upstream class (bagel-compat §4.5–4.6). The sequence plan each kind emits lives in
`datasets_catalog.plan`; record parsing and validation in `datasets_catalog.records`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskKind:
    name: str                       # our short alias, used in shards and logs
    upstream: str                   # upstream class name (accepted in YAML)
    record_style: str               # "umv" (input_img/output_img/message) or "vlm_sft" (image/conversations)
    needs_images: bool              # data_dir and at least one image required
    min_input_images: int
    max_input_images: int | None    # None = any number
    min_output_images: int
    max_output_images: int | None
    min_messages: int
    vit_img_num_is_image_count: bool = False  # vlm_sft shares the pixel budget between images (§4.2)
    generation: bool = False        # emits noised VAE targets (needs visual_gen)
    description: str = ""


TASK_KINDS: tuple[TaskKind, ...] = (
    TaskKind("sft", "SftJSONLIterableDataset_Ver1", "umv", True, 1, None, 0, 0, 2,
             description="VQA / report SFT: images are seen through the ViT, answers are the loss"),
    TaskKind("text_only", "SftJSONLIterableDataset_TextOnly", "umv", False, 0, None, 0, None, 2,
             description="text-only SFT; <image> tags are removed"),
    TaskKind("sft_recon_v1", "SftJSONLIterableDataset_with_VisualReconstruction_Ver1", "umv", True, 1, None, 0, 0, 2,
             generation=True, description="SFT plus reconstruction of each input image (ViT context)"),
    TaskKind("sft_recon_v2", "SftJSONLIterableDataset_with_VisualReconstruction_Ver2", "umv", True, 1, None, 0, 0, 2,
             generation=True, description="SFT plus reconstruction of each input image (VAE + ViT context)"),
    TaskKind("t2i", "T2IIterableDataset_Ver1", "umv", True, 0, None, 0, None, 1,
             generation=True, description="text-to-image: captions in, image out"),
    TaskKind("edit", "MedicalImageEditingIterableDataset_ver1", "umv", True, 1, None, 1, None, 2,
             generation=True, description="image editing / stain translation: input image + instruction -> output image"),
    TaskKind("counterfactual", "CounterfactualMedicalIterableDataset_ver1", "umv", True, 1, None, 1, None, 2,
             generation=True, description="counterfactual generation: image + instruction -> image, then explanation"),
    TaskKind("vlm_sft", "SftJSONLIterableDataset", "vlm_sft", True, 1, None, 0, 0, 2,
             vit_img_num_is_image_count=True,
             description="BAGEL vlm_sft records: `image` + `conversations`"),
)

_BY_KEY: dict[str, TaskKind] = {}
for _kind in TASK_KINDS:
    _BY_KEY[_kind.name.lower()] = _kind
    _BY_KEY[_kind.upstream.lower()] = _kind
_BY_KEY["vqa"] = _BY_KEY["sft"]


class UnknownTaskKind(ValueError):
    pass


def resolve_task_kind(name: str) -> TaskKind:
    """Look up a kind by alias or upstream class name (case-insensitive); errors name close matches."""
    kind = _BY_KEY.get(str(name).lower())
    if kind is not None:
        return kind
    choices = sorted({k.name for k in TASK_KINDS} | {k.upstream for k in TASK_KINDS})
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownTaskKind(f"unknown task kind {name!r}.{hint} Known kinds: {', '.join(choices)}")
