"""Task kinds: the UniMedVL / BAGEL dataset classes, their aliases and every per-kind fact.

One `TaskKind` per upstream class. Everything that differs between kinds is a field here, so a new kind is
one entry in `TASK_KINDS` (plus a plan builder in `datasets_catalog.plan` if its sequence has a new shape).
Record parsing and validation (`datasets_catalog.records`), the sequence plan (`datasets_catalog.plan`) and the
trainer read these fields; none of them compares kind names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

# How `<image>` tags in the prompts relate to the input images (read by records and plan):
#   "removed"     the tags are deleted from the text; nothing is checked
#   "forbidden"   no message may carry a tag (plain-text prompts)
#   "per_turn"    the k-th tag of a turn shows input image k; the most-tagged prompt tags every image
#   "in_order"    tags take the images in order across turns; one tag per image
#   "one_source"  the instruction (last prompt) tags the single source image at most once
# Under "forbidden", "per_turn" and "in_order" answers cannot carry tags either.
ImageTagRule = Literal["removed", "forbidden", "per_turn", "in_order", "one_source"]


@dataclass(frozen=True)
class TaskKind:
    name: str                       # our short alias, used in shards and logs
    upstream: str                   # upstream class name (accepted in YAML)
    record_style: str               # "umv" (input_img/output_img/message) or "vlm_sft" (image/conversations)
    needs_images: bool              # data_dir and image fields; False: the record is its messages only
    min_input_images: int
    max_input_images: int | None    # None = any number
    min_output_images: int
    max_output_images: int | None
    min_messages: int
    plan: str                       # sequence shape: a builder name in datasets_catalog.plan.PLAN_BUILDERS
    image_tags: ImageTagRule
    min_images: int = 0             # input and output images together (t2i: the target may be under either)
    vit_context: bool = False       # input images are shown through the ViT
    vae_context: bool = False       # input images are also shown as clean VAE latents (before the ViT)
    vit_cfg_dropout: bool = False   # those ViT elements may be CFG-dropped (enable_cfg=1)
    vit_img_num_is_image_count: bool = False  # the ViT pixel budget is shared between the images (vlm_sft)
    generation: bool = False        # emits noised VAE targets (needs visual_gen)
    max_content_tokens: int | None = None     # longer samples are skipped upstream (rejected as too_long here)
    description: str = ""

    @property
    def always_vit(self) -> bool:
        """Every sample carries ViT tokens that CFG dropout never removes."""
        return self.vit_context and not self.vit_cfg_dropout


TASK_KINDS: tuple[TaskKind, ...] = (
    TaskKind("sft", "SftJSONLIterableDataset_Ver1", "umv", True, 1, None, 0, 0, 2,
             plan="sft_turns", image_tags="per_turn", vit_context=True, vit_cfg_dropout=True,
             description="VQA / report SFT: images are seen through the ViT, answers are the loss"),
    TaskKind("text_only", "SftJSONLIterableDataset_TextOnly", "umv", False, 0, None, 0, None, 2,
             plan="text_only", image_tags="removed",
             description="text-only SFT; <image> tags are removed"),
    TaskKind("sft_recon_v1", "SftJSONLIterableDataset_with_VisualReconstruction_Ver1", "umv", True, 1, None, 0, 0, 2,
             plan="sft_recon", image_tags="per_turn", vit_context=True, generation=True,
             description="SFT plus reconstruction of each input image (ViT context)"),
    TaskKind("sft_recon_v2", "SftJSONLIterableDataset_with_VisualReconstruction_Ver2", "umv", True, 1, None, 0, 0, 2,
             plan="sft_recon", image_tags="per_turn", vit_context=True, vae_context=True, generation=True,
             description="SFT plus reconstruction of each input image (VAE + ViT context)"),
    TaskKind("t2i", "T2IIterableDataset_Ver1", "umv", True, 0, None, 0, None, 1,
             plan="t2i", image_tags="forbidden", min_images=1, generation=True,
             description="text-to-image: captions in, image out"),
    TaskKind("edit", "MedicalImageEditingIterableDataset_ver1", "umv", True, 1, None, 1, None, 2,
             plan="edit", image_tags="one_source", vit_context=True, vae_context=True, generation=True,
             description="image editing / stain translation: input image + instruction -> output image"),
    TaskKind("counterfactual", "CounterfactualMedicalIterableDataset_ver1", "umv", True, 1, None, 1, None, 2,
             plan="counterfactual", image_tags="one_source", vit_context=True, vae_context=True, generation=True,
             max_content_tokens=18000,
             description="counterfactual generation: image + instruction -> image, then explanation"),
    TaskKind("vlm_sft", "SftJSONLIterableDataset", "vlm_sft", True, 1, None, 0, 0, 2,
             plan="sft_turns", image_tags="in_order", vit_context=True, vit_img_num_is_image_count=True,
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
