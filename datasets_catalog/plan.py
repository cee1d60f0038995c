"""Sequence plans (docs/upstream-compat.md#pack-sequence, #sequence-plans): the ordered list of text / ViT / VAE elements per sample.

A plan is data, built once from a validated record. Ingest uses it to count the packed length, the
packer turns it into tensors. Neither re-implements the per-class rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from .task_kinds import TaskKind

ElementType = Literal["text", "vit_image", "vae_image"]
IMAGE_TAG = "<image>"
RECON_SUFFIX = "Please also reconstruct the image at the end"


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


def _show_input(plan: SamplePlan, kind: TaskKind, slot: ImageSlot) -> None:
    """An input image in the context, as the kind shows it: clean VAE latents and/or ViT tokens."""
    if kind.vae_context:
        plan.vae(slot, loss=0, cfg=0)
    if kind.vit_context:
        plan.vit(slot, loss=0, cfg=int(kind.vit_cfg_dropout))


def _sft_turns(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], recon_suffix: bool,
               n_images: int, strip_pieces: bool = True) -> None:
    """Upstream `change_format` + element loop of the SFT classes.

    Upstream details kept for data compatibility: a human turn without `<image>` is kept verbatim (not
    stripped); pieces of a turn with tags are stripped and empty ones dropped; a tag becomes an image only
    while its index within the turn is < the number of images (`idx < num_images`); texts that encode to
    zero tokens (the empty string) are skipped.
    """
    # Quirk (data compatibility): UMV classes index the image by the tag's position within its own turn
    # ("per_turn"); BAGEL's vlm_sft consumes images in order across turns ("in_order").
    in_order = kind.image_tags == "in_order"
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
                if i >= n_images:
                    continue  # upstream: `(idx != last) and (idx < num_images)`
                slot = ImageSlot("input", image_counter if in_order else i)
                if in_order:
                    if image_counter >= n_images:
                        continue  # upstream would pop from an empty image list; never reference a missing image
                    image_counter += 1
                _show_input(plan, kind, slot)


def _last(messages: Sequence[Message], role: str) -> str | None:
    for message in reversed(messages):
        if message.role == role:
            return message.value
    return None


def _plan_sft_turns(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
                    n_output: int) -> None:
    """Turns in order; each tagged input image shown where its tag stands (sft, vlm_sft)."""
    _sft_turns(plan, kind, messages, recon_suffix=False, n_images=n_input)


def _plan_sft_recon(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
                    n_output: int) -> None:
    """The SFT turns with the reconstruction request appended, then every input image as a VAE target."""
    _sft_turns(plan, kind, messages, recon_suffix=True, n_images=n_input)
    for i in range(n_input):
        plan.vae(ImageSlot("input", i), loss=1, cfg=0)


def _plan_text_only(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
                    n_output: int) -> None:
    """Every turn with its tags removed and whitespace collapsed; answers are the loss."""
    for message in messages:
        text = re.sub(r"\s+", " ", message.value.replace(IMAGE_TAG, "")).strip()
        if text:  # upstream drops texts that are empty after cleaning
            plan.text(text, loss=1 if message.role == "gpt" else 0, cfg=0)


def _plan_t2i(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
              n_output: int) -> None:
    """Captions (prompts CFG-droppable), then every output image as a VAE target (the inputs if none)."""
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


def _plan_edit(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
               n_output: int) -> None:
    """Source image, the last instruction, the last answer, then the target image."""
    _show_input(plan, kind, ImageSlot("input", 0))
    human, gpt = _last(messages, "human"), _last(messages, "gpt")
    if human is not None and human.strip():
        plan.text(human.strip(), loss=0, cfg=0)  # stripped, but <image> is not parsed here (upstream)
    if gpt and gpt.strip():
        plan.text(gpt.strip(), loss=1, cfg=0)
    plan.vae(ImageSlot("output", 0), loss=1, cfg=0)


def _plan_counterfactual(plan: SamplePlan, kind: TaskKind, messages: Sequence[Message], n_input: int,
                         n_output: int) -> None:
    """Source image, the last instruction without its tags, the target image, then the explanation."""
    _show_input(plan, kind, ImageSlot("input", 0))
    human, gpt = _last(messages, "human"), _last(messages, "gpt")
    for piece in _split_tags(human or ""):
        if piece.strip():
            plan.text(piece.strip(), loss=0, cfg=0)
    plan.vae(ImageSlot("output", 0), loss=1, cfg=0)
    if gpt and gpt.strip():
        plan.text(gpt.strip(), loss=1, cfg=0)  # upstream strips the explanation


PlanBuilder = Callable[[SamplePlan, TaskKind, Sequence[Message], int, int], None]

# The sequence shapes, by the name a `TaskKind.plan` gives.
PLAN_BUILDERS: dict[str, PlanBuilder] = {
    "sft_turns": _plan_sft_turns,
    "sft_recon": _plan_sft_recon,
    "text_only": _plan_text_only,
    "t2i": _plan_t2i,
    "edit": _plan_edit,
    "counterfactual": _plan_counterfactual,
}


def build_plan(kind: TaskKind, messages: Sequence[Message], n_input: int, n_output: int) -> SamplePlan:
    """The upstream sequence plan of one validated record of this task kind."""
    builder = PLAN_BUILDERS.get(kind.plan)
    if builder is None:
        raise ValueError(f"task kind {kind.name!r} names plan {kind.plan!r}, which is not one of "
                         f"{', '.join(PLAN_BUILDERS)}")
    plan = SamplePlan()
    builder(plan, kind, messages, n_input, n_output)
    return plan


@dataclass(frozen=True)
class ImageTokens:
    """Token counts of one image under the dataset's transforms (stored in the shard)."""

    vae_tokens: int
    vit_tokens: int


def packed_length(plan: SamplePlan, text_token_counts: Sequence[int],
                  images: dict[ImageSlot, ImageTokens]) -> int:
    """Tokens this sample occupies in a pack: content tokens + 2 markers per element.

    Equals upstream's `num_tokens + 2 * len(sequence_plan)` (docs/upstream-compat.md#pack-membership) when no CFG dropout happens.
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
