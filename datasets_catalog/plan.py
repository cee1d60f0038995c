"""Sequence plans (bagel-compat §4.3, §4.6): the ordered list of text / ViT / VAE elements per sample.

A plan is data, built once from a validated record. Ingest uses it to count the packed length, the
packer turns it into tensors. Neither re-implements the per-class rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from .task_kinds import TaskKind

ElementType = Literal["text", "vit_image", "vae_image"]
IMAGE_TAG = "<image>"
RECON_SUFFIX = "Please also reconstruct the image at the end"
COUNTERFACTUAL_MAX_TOKENS = 18000


@dataclass(frozen=True)
class ImageSlot:
    role: Literal["input", "output"]
    index: int


@dataclass(frozen=True)
class PlanItem:
    type: ElementType
    loss: int
    enable_cfg: int
    text: str | None = None
    image: ImageSlot | None = None
    special_token_loss: int = 0
    special_token_label: int | None = None


@dataclass(frozen=True)
class Message:
    role: Literal["human", "gpt"]
    value: str


@dataclass
class SamplePlan:
    items: list[PlanItem] = field(default_factory=list)

    def text(self, text: str, loss: int, cfg: int) -> None:
        self.items.append(PlanItem("text", loss, cfg, text=text))

    def vit(self, slot: ImageSlot, loss: int, cfg: int) -> None:
        self.items.append(PlanItem("vit_image", loss, cfg, image=slot))

    def vae(self, slot: ImageSlot, loss: int, cfg: int) -> None:
        self.items.append(PlanItem("vae_image", loss, cfg, image=slot))

    @property
    def has_loss(self) -> bool:
        return any(item.loss for item in self.items)


def _split_tags(value: str) -> list[str]:
    return value.split(IMAGE_TAG)


def _sft_turns(plan: SamplePlan, messages: Sequence[Message], vit_cfg: int, with_vae: bool,
               recon_suffix: bool, global_image_counter: bool, strip_pieces: bool = True,
               n_images: int | None = None) -> None:
    """Upstream `change_format` + element loop of the SFT classes.

    Upstream details kept for data compatibility: a human turn without `<image>` is kept verbatim (not
    stripped); pieces of a turn with tags are stripped and empty ones dropped; a tag becomes an image only
    while its index within the turn is < the number of images (`idx < num_images`); texts that encode to
    zero tokens (the empty string) are skipped.
    """
    image_counter = 0
    for message in messages:
        if message.role == "gpt":
            if message.value:
                plan.text(message.value, loss=1, cfg=0)
            continue
        parts = _split_tags(message.value)
        has_images = len(parts) > 1
        pieces = [p.strip() if (strip_pieces and has_images) else p for p in parts]
        if recon_suffix:
            if not has_images:
                pieces = [message.value + RECON_SUFFIX]
            else:
                nonempty = [i for i, p in enumerate(pieces) if p]
                if nonempty:
                    pieces[nonempty[-1]] = pieces[nonempty[-1]] + " " + RECON_SUFFIX
        for i, piece in enumerate(pieces):
            if piece:
                plan.text(piece, loss=0, cfg=0)
            if i < len(pieces) - 1:
                if n_images is not None and i >= n_images:
                    continue  # upstream: `(idx != last) and (idx < num_images)`
                # Quirk (data compatibility): UMV classes index the image by the tag's position within
                # its own turn; BAGEL's vlm_sft consumes images in order across turns.
                slot = ImageSlot("input", image_counter if global_image_counter else i)
                if global_image_counter:
                    if n_images is not None and image_counter >= n_images:
                        continue  # upstream would pop from an empty image list; never reference a missing image
                    image_counter += 1
                if with_vae:
                    plan.vae(slot, loss=0, cfg=0)
                plan.vit(slot, loss=0, cfg=vit_cfg)


def _last(messages: Sequence[Message], role: str) -> str | None:
    for message in reversed(messages):
        if message.role == role:
            return message.value
    return None


def build_plan(kind: TaskKind, messages: Sequence[Message], n_input: int, n_output: int) -> SamplePlan:
    """The upstream sequence plan of one validated record of this task kind."""
    plan = SamplePlan()
    name = kind.name
    if name == "sft":
        _sft_turns(plan, messages, vit_cfg=1, with_vae=False, recon_suffix=False, global_image_counter=False,
                   n_images=n_input)
    elif name == "vlm_sft":
        _sft_turns(plan, messages, vit_cfg=0, with_vae=False, recon_suffix=False, global_image_counter=True,
                   n_images=n_input)
    elif name == "text_only":
        for message in messages:
            text = re.sub(r"\s+", " ", message.value.replace(IMAGE_TAG, "")).strip()
            if text:  # upstream drops texts that are empty after cleaning
                plan.text(text, loss=1 if message.role == "gpt" else 0, cfg=0)
    elif name in ("sft_recon_v1", "sft_recon_v2"):
        _sft_turns(plan, messages, vit_cfg=0, with_vae=(name == "sft_recon_v2"), recon_suffix=True,
                   global_image_counter=False, n_images=n_input)
        for i in range(n_input):
            plan.vae(ImageSlot("input", i), loss=1, cfg=0)
    elif name == "t2i":
        for message in messages:
            if not message.value:
                continue  # upstream skips texts that encode to zero tokens
            if message.role == "human":
                plan.text(message.value, loss=0, cfg=1)
            else:
                plan.text(message.value, loss=1, cfg=0)
        role = "output" if n_output > 0 else "input"
        for i in range(n_output if n_output > 0 else n_input):
            plan.vae(ImageSlot(role, i), loss=1, cfg=0)
    elif name == "edit":
        source, target = ImageSlot("input", 0), ImageSlot("output", 0)
        plan.vae(source, loss=0, cfg=0)
        plan.vit(source, loss=0, cfg=0)
        human, gpt = _last(messages, "human"), _last(messages, "gpt")
        if human is not None and human.strip():
            plan.text(human.strip(), loss=0, cfg=0)  # stripped, but <image> is not parsed here (upstream)
        if gpt and gpt.strip():
            plan.text(gpt.strip(), loss=1, cfg=0)
        plan.vae(target, loss=1, cfg=0)
    elif name == "counterfactual":
        source, target = ImageSlot("input", 0), ImageSlot("output", 0)
        plan.vae(source, loss=0, cfg=0)
        plan.vit(source, loss=0, cfg=0)
        human, gpt = _last(messages, "human"), _last(messages, "gpt")
        for piece in _split_tags(human or ""):
            if piece.strip():
                plan.text(piece.strip(), loss=0, cfg=0)
        plan.vae(target, loss=1, cfg=0)
        if gpt and gpt.strip():
            plan.text(gpt.strip(), loss=1, cfg=0)  # upstream strips the explanation
    else:  # pragma: no cover - TASK_KINDS and this function are kept in step by tests
        raise ValueError(f"no plan rule for task kind {name!r}")
    return plan


@dataclass(frozen=True)
class ImageTokens:
    """Token counts of one image under the dataset's transforms (stored in the shard)."""

    vae_tokens: int
    vit_tokens: int


def packed_length(plan: SamplePlan, text_token_counts: Sequence[int],
                  images: dict[ImageSlot, ImageTokens]) -> int:
    """Tokens this sample occupies in a pack: content tokens + 2 markers per element.

    Equals upstream's `num_tokens + 2 * len(sequence_plan)` (§4.3) when no CFG dropout happens.
    `text_token_counts` holds one count per text item, in plan order.
    """
    total = 0
    texts = iter(text_token_counts)
    for item in plan.items:
        if item.type == "text":
            total += next(texts)
        elif item.type == "vit_image":
            total += images[item.image].vit_tokens
        else:
            total += images[item.image].vae_tokens
        total += 2
    return total
