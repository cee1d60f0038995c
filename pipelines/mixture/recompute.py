"""Recompute resize targets and `num_tokens` of a shard row for transforms other than the shards' own.

Uses the stored header sizes (width, height), the shared resize rule and the shared plan, so no image is
decoded and the numbers are exactly what ingest would have written with these transforms.
"""
from __future__ import annotations

from typing import Any

from datasets_catalog.plan import ImageSlot, ImageTokens, Message, build_plan, packed_length
from datasets_catalog.records import vit_img_num
from datasets_catalog.task_kinds import TaskKind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs, vae_tokens, vit_tokens

# Columns the metadata path needs to recompute (image bytes are never read for this).
RECOMPUTE_COLUMNS = (
    "messages",
    *(f"{role}.list.element.{f}" for role in ("input_images", "output_images") for f in ("width", "height")),
)


def recompute_images(row: dict[str, Any], kind: TaskKind, vae: ImageTransformArgs,
                     vit: ImageTransformArgs) -> dict[str, Any]:
    """The row with its images' vae_/vit_ sizes and token counts for these transforms (a new dict; stored
    pixels of another size dropped). Text counts are untouched: they do not depend on the transforms."""
    row = dict(row)
    inputs = [dict(im) for im in row.get("input_images") or []]
    outputs = [dict(im) for im in row.get("output_images") or []]
    img_num = vit_img_num(kind, len(inputs))
    for im in (*inputs, *outputs):
        w, h = int(im["width"]), int(im["height"])
        for which, size, tokens in (("vae", vae.target_size(w, h), vae_tokens),
                                    ("vit", vit.target_size(w, h, img_num), vit_tokens)):
            if size != (im.get(f"{which}_width"), im.get(f"{which}_height")):
                im[f"{which}_pixels"] = None   # stored pixels (store_pixels) have the old size: decode instead
            im[f"{which}_width"], im[f"{which}_height"] = size
            im[f"{which}_tokens"] = tokens(*size)
    row["input_images"], row["output_images"] = inputs, outputs
    return row


def recompute_row(row: dict[str, Any], kind: TaskKind, vae: ImageTransformArgs, vit: ImageTransformArgs,
                  tokenizer: TextTokenizer) -> dict[str, Any]:
    """The row with vae_/vit_ sizes, token counts and num_tokens for these transforms (a new dict)."""
    row = recompute_images(row, kind, vae, vit)
    inputs, outputs = row["input_images"], row["output_images"]
    messages = [Message(m["from"], m["value"]) for m in row.get("messages") or []]
    plan = build_plan(kind, messages, len(inputs), len(outputs))
    texts = tokenizer.count_tokens([item.text or "" for item in plan.items if item.type == "text"])
    images = {ImageSlot("input", j): ImageTokens(im["vae_tokens"], im["vit_tokens"]) for j, im in enumerate(inputs)}
    images.update({ImageSlot("output", j): ImageTokens(im["vae_tokens"], im["vit_tokens"])
                   for j, im in enumerate(outputs)})
    row["text_tokens"] = sum(texts)
    row["num_tokens"] = packed_length(plan, texts, images)
    return row
