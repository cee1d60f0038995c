"""Packing: a list of drawn samples -> one `PackedBatch` with upstream `pack_sequence` semantics.

bagel-compat §4.3 (pack_sequence table, to_tensor), §2.4 (fields), §2.7 (masks). The sequence plan of a
sample comes only from `datasets_catalog.plan.build_plan`; this module turns plans into tensors.

Which samples form a pack is decided by the mixture stream (pipelines.mixture.stream); this function only
materialises them. Randomness (CFG dropout, timesteps) is a pure function of (seed, sample.draw_key): see
`pipelines.packing.rng` for why this replaces upstream's per-process salted-hash reseeding.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from datasets_catalog.plan import ImageSlot, Message, PlanItem, SamplePlan, build_plan
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import VAE_DOWNSAMPLE

from pipelines.imaging.decode import ImageDecodeError, image_to_tensor, load_image_rgb, normalise_, resize_rgb
from pipelines.imaging.pixels import stored_pixels
from pipelines.packing.masks import allowed_pairs, prepare_attention_mask_per_sample
from pipelines.packing.packed_batch import PackedBatch
from pipelines.packing.config import PackingConfig
from pipelines.packing.ops import len2weight, patchify, patchify_hwc
from pipelines.packing.rng import CFG, TIMESTEP, sample_generator
from pipelines.packing.position_ids import (
    get_flattened_position_ids,
    get_flattened_position_ids_extrapolate,
    get_flattened_position_ids_interpolate,
)
from pipelines.packing.sample import StreamSample

__all__ = [
    "build_packed_batch", "build_packed_batch_from_plans", "sample_plan", "PackingError",
    "prepare_attention_mask_per_sample", "allowed_pairs", "patchify", "len2weight",
    "get_flattened_position_ids", "get_flattened_position_ids_extrapolate",
    "get_flattened_position_ids_interpolate", "load_image_rgb", "image_to_tensor",
]


log = logging.getLogger(__name__)
ON_IMAGE_ERROR = ("skip", "raise")


class PackingError(ValueError):
    """A sample that cannot be packed (missing image, size beyond the position tables, ...)."""


def _column(row: dict[str, Any], name: str) -> list[Any]:
    """A list column of a shard row; None (and array-likes from pandas) become plain lists."""
    value = row.get(name)
    return [] if value is None else list(value)


def _messages(row: dict[str, Any]) -> list[Message]:
    return [Message(m["from"], m["value"] if m["value"] is not None else "") for m in _column(row, "messages")]


def sample_plan(sample: StreamSample) -> SamplePlan:
    """The spec §4.6 plan of a drawn sample (built by datasets_catalog.plan, never re-derived here)."""
    row = sample.row
    kind = resolve_task_kind(sample.task)
    return build_plan(kind, _messages(row), len(_column(row, "input_images")), len(_column(row, "output_images")))


class _SampleImages:
    """The resized uint8 pixels of a row's images: stored ones (store_pixels shards), else each image decoded
    at most once and resized per use (VAE and ViT targets differ)."""

    def __init__(self, sample: StreamSample, jpeg_draft: bool = False) -> None:
        self.sample = sample
        self.jpeg_draft = jpeg_draft
        self._decoded: dict[ImageSlot, Any] = {}

    def record(self, slot: ImageSlot) -> dict[str, Any]:
        images = _column(self.sample.row, f"{slot.role}_images")
        if slot.index >= len(images):
            raise PackingError(
                f"sample {self.sample.sample_id}: the plan needs {slot.role} image {slot.index} but the row has "
                f"{len(images)}; fix the record (an <image> tag without an image?)")
        return images[slot.index]

    def pixels(self, slot: ImageSlot, which: str) -> torch.Tensor:
        """[H, W, 3] uint8 at the stored `which` target; the packer normalises to [-1, 1] once per pack."""
        rec = self.record(slot)
        width, height = rec.get(f"{which}_width"), rec.get(f"{which}_height")
        if not width or not height:
            raise PackingError(f"sample {self.sample.sample_id}: {slot.role} image {slot.index} has no stored "
                               f"{which}_width/{which}_height; re-run ingest for this dataset")
        array = stored_pixels(rec, which)   # store_pixels shards: decoded and resized at ingest
        if array is None:
            if slot not in self._decoded:
                self._decoded[slot] = self._decode(rec)   # RGB (load_image_rgb)
            array = np.array(resize_rgb(self._decoded[slot], int(width), int(height)), dtype=np.uint8)
        return torch.from_numpy(array)

    def _decode(self, rec: dict[str, Any]):
        data = rec.get("bytes")
        path = None
        if rec.get("path"):
            rel = str(rec["path"]).lstrip("/\\")  # upstream strips the leading separator before joining
            path = Path(self.sample.data_dir) / rel if self.sample.data_dir else Path(rel)
        if data is None and not self.sample.data_dir:
            raise PackingError(f"sample {self.sample.sample_id}: image {rec.get('path')!r} has no stored bytes "
                               f"and the sample has no data_dir to resolve it")
        draft = None
        if self.jpeg_draft:   # never below either stored target: both uses (VAE, ViT) share one decode
            sizes = [(int(rec.get(f"{w}_width") or 0), int(rec.get(f"{w}_height") or 0)) for w in ("vae", "vit")]
            draft = (max(s[0] for s in sizes), max(s[1] for s in sizes))
            if min(draft) <= 0:
                draft = None
        return load_image_rgb(data, path, rec.get("meta"), draft_size=draft)


@dataclass
class _Status:
    """Upstream `sequence_status`: the growing lists of one pack."""

    curr: int = 0
    sample_lens: list[int] = field(default_factory=list)
    packed_text_ids: list[int] = field(default_factory=list)
    packed_text_indexes: list[int] = field(default_factory=list)
    packed_position_ids: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    nested_attention_masks: list[torch.Tensor] = field(default_factory=list)
    vit_tokens: list[torch.Tensor] = field(default_factory=list)
    vit_token_seqlens: list[int] = field(default_factory=list)
    vit_position_ids: list[torch.Tensor] = field(default_factory=list)
    vit_token_indexes: list[int] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)
    vae_latent_shapes: list[tuple[int, int]] = field(default_factory=list)
    latent_position_ids: list[torch.Tensor] = field(default_factory=list)
    vae_token_indexes: list[int] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    mse_loss_indexes: list[int] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)
    ce_loss_indexes: list[int] = field(default_factory=list)
    ce_loss_weights: list[float] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: {"text": 0, "vit": 0, "vae": 0})

    def mark(self) -> dict[str, Any]:
        """Enough to undo a partly packed sample: list lengths, the cursor and the drop counts."""
        return {f.name: (len(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    def rollback(self, mark: dict[str, Any]) -> None:
        for name, value in mark.items():
            current = getattr(self, name)
            if isinstance(current, list):
                del current[value:]
            else:
                setattr(self, name, value)


def _special_token(status: _Status, token: int, pos: int, item: PlanItem | None = None) -> None:
    """One special token (eos, start/end of image) at `pos`, with its CE target when `item.special_token_loss`."""
    status.packed_text_ids.append(token)
    status.packed_text_indexes.append(pos)
    if item is not None and item.special_token_loss == 1:
        status.ce_loss_indexes.append(pos)
        status.ce_loss_weights.append(1.0)
        status.label_ids.append(item.special_token_label)


def _grid_position_ids(sample_id: str, what: str, height: int, width: int, patch: int, limit: int, setting: str,
                       interpolate: bool) -> tuple[int, int, torch.Tensor]:
    """(rows, cols, flattened position ids) of an image's patch grid; without interpolation a grid beyond the
    position table is refused, since extrapolated ids would leave it."""
    h, w = height // patch, width // patch
    if not interpolate and (h > limit or w > limit):
        raise PackingError(
            f"sample {sample_id}: {what} grid {h}x{w} exceeds {setting}={limit} (extrapolated position ids "
            f"would leave the table); raise {setting} (64 for the released checkpoints) or shrink the transforms")
    return h, w, get_flattened_position_ids(height, width, patch, limit, interpolate=interpolate)


def _pack_sample(sample: StreamSample, plan: SamplePlan, text_ids: list[list[int]], status: _Status,
                 config: PackingConfig, tokenizer: TextTokenizer, seed: int) -> int:
    """Append one sample to `status` exactly as upstream pack_sequence does; returns its length."""
    special = tokenizer.special
    cfg_rng = sample_generator(seed, sample.draw_key, CFG)
    t_rng = sample_generator(seed, sample.draw_key, TIMESTEP)
    images = _SampleImages(sample, config.jpeg_draft)
    texts = iter(text_ids)
    split_lens: list[int] = []
    attn_modes: list[str] = []
    curr = status.curr
    rope = 0
    sample_len = 0
    split_len = 0
    timestep = float("-inf")
    downsample = config.latent_patch_size * (VAE_DOWNSAMPLE // 2)  # FLUX 8x times the latent patch

    def cfg_drop(item: PlanItem, p: float) -> bool:
        # one uniform per enable_cfg element, in plan order; never a draw (nor a drop) when enable_cfg=0
        return item.enable_cfg == 1 and float(cfg_rng.random()) < p

    for item in plan.items:
        split_start = getattr(item, "split_start", True)
        frame_delta = getattr(item, "frame_delta", None)
        if split_start:
            split_len = 0

        if item.type == "text":
            ids = next(texts)
            if cfg_drop(item, config.text_cond_dropout_prob):
                status.dropped["text"] += 1
                continue
            shifted = [special.bos, *ids]
            status.packed_text_ids.extend(shifted)
            status.packed_text_indexes.extend(range(curr, curr + len(shifted)))
            if item.loss == 1:
                status.ce_loss_indexes.extend(range(curr, curr + len(shifted)))
                status.ce_loss_weights.extend([len2weight(len(shifted), config.len2weight_mode)] * len(shifted))
                status.label_ids.extend([*ids, special.eos])
            curr += len(shifted)
            split_len += len(shifted)
            _special_token(status, special.eos, curr, item)
            curr += 1
            split_len += 1
            attn_modes.append("causal")
            status.packed_position_ids.extend(range(rope, rope + split_len))
            rope += split_len

        elif item.type == "vit_image":
            if cfg_drop(item, config.vit_cond_dropout_prob):
                status.dropped["vit"] += 1
                rope += 1
                continue
            pixels = images.pixels(item.image, "vit")
            height, width = pixels.shape[0], pixels.shape[1]
            _special_token(status, special.start_of_image, curr)
            curr += 1
            split_len += 1
            tokens = patchify_hwc(pixels, config.vit_patch_size)   # uint8; normalised once per pack
            n = tokens.shape[0]
            status.vit_token_indexes.extend(range(curr, curr + n))
            curr += n
            split_len += n
            status.vit_tokens.append(tokens)
            status.vit_token_seqlens.append(n)
            status.vit_position_ids.append(_grid_position_ids(
                sample.sample_id, "ViT patch", height, width, config.vit_patch_size,
                config.vit_max_num_patch_per_side, "vit_max_num_patch_per_side", config.interpolate_pos)[2])
            _special_token(status, special.end_of_image, curr, item)
            curr += 1
            split_len += 1
            attn_modes.append("full")
            status.packed_position_ids.extend([rope] * split_len)
            rope += 1

        elif item.type == "vae_image":
            if cfg_drop(item, config.vae_cond_dropout_prob):
                status.dropped["vae"] += 1
                rope += 1
                continue
            pixels = images.pixels(item.image, "vae")
            height, width = pixels.shape[0], pixels.shape[1]
            _special_token(status, special.start_of_image, curr)
            curr += 1
            split_len += 1
            status.vae_images.append(pixels)   # uint8 [H, W, 3]; normalised into the padded batch
            h, w, ids = _grid_position_ids(sample.sample_id, "VAE latent", height, width, downsample,
                                           config.max_latent_size, "max_latent_size", config.interpolate_pos)
            status.latent_position_ids.append(ids)
            status.vae_latent_shapes.append((h, w))
            n = h * w
            status.vae_token_indexes.extend(range(curr, curr + n))
            if item.loss == 1:
                status.mse_loss_indexes.extend(range(curr, curr + n))
                if split_start:  # one draw per split: frames of a multi-frame split share it
                    timestep = float(t_rng.standard_normal())
            else:
                timestep = float("-inf")
            status.timesteps.extend([timestep] * n)
            curr += n
            split_len += n
            _special_token(status, special.end_of_image, curr, item)
            curr += 1
            split_len += 1
            if split_start:
                attn_modes.append("noise" if item.loss == 1 and frame_delta is None else "full")
            status.packed_position_ids.extend([rope] * (n + 2))
            if frame_delta is not None:
                rope += frame_delta
            elif item.loss == 0:
                rope += 1
        else:  # pragma: no cover - PlanItem.type is a closed set
            raise PackingError(f"unknown plan item type {item.type!r}")

        if getattr(item, "split_end", True):
            split_lens.append(split_len)
            sample_len += split_len

    status.curr = curr
    status.sample_lens.append(sample_len)
    status.split_lens.extend(split_lens)
    status.attn_modes.extend(attn_modes)
    if not config.use_flex and config.build_nested_masks:
        status.nested_attention_masks.append(prepare_attention_mask_per_sample(split_lens, attn_modes))
    return sample_len


def _long(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))   # ~2x faster than torch.tensor(list)


def build_packed_batch(samples: Sequence[StreamSample], config: PackingConfig, tokenizer: TextTokenizer,
                       seed: int, *, on_image_error: str = "skip") -> PackedBatch:
    """Materialise one pack: plans -> text ids, images, masks, position ids and targets (spec §2.4).

    `samples` come in pack order; every random decision depends only on (seed, sample.draw_key).
    An image that cannot be read or decoded (a referenced file deleted since ingest, corrupt bytes) drops
    that one sample, as upstream skips such rows, but never silently: it is listed in
    `metrics["skipped_samples"]` and logged. `on_image_error="raise"` raises instead.
    """
    return build_packed_batch_from_plans(samples, [sample_plan(s) for s in samples], config, tokenizer, seed,
                                         on_image_error=on_image_error)


def build_packed_batch_from_plans(samples: Sequence[StreamSample], plans: Sequence[SamplePlan],
                                  config: PackingConfig, tokenizer: TextTokenizer, seed: int, *,
                                  on_image_error: str = "skip") -> PackedBatch:
    """Like `build_packed_batch` with the plans given (custom plans: video splits, BAGEL-style cfg=1 images)."""
    if not samples:
        raise PackingError("cannot build a packed batch from zero samples")
    if len(plans) != len(samples):
        raise PackingError(f"{len(samples)} samples but {len(plans)} plans")
    if on_image_error not in ON_IMAGE_ERROR:
        raise ValueError(f"on_image_error must be one of {ON_IMAGE_ERROR}, got {on_image_error!r}")
    all_texts = [item.text or "" for plan in plans for item in plan.items if item.type == "text"]
    encoded = iter(tokenizer.encode_batch(all_texts) if all_texts else [])
    status = _Status()
    tokens_per_group: dict[str, int] = defaultdict(int)
    samples_per_group: dict[str, int] = defaultdict(int)
    tokens_per_dataset: dict[str, int] = defaultdict(int)
    packed: list[StreamSample] = []
    skipped: list[dict[str, str]] = []
    for sample, plan in zip(samples, plans):
        text_ids = [list(next(encoded)) for item in plan.items if item.type == "text"]
        mark = status.mark()
        try:
            length = _pack_sample(sample, plan, text_ids, status, config, tokenizer, seed)
        except ImageDecodeError as exc:
            if on_image_error == "raise":
                raise PackingError(f"sample {sample.sample_id} (dataset {sample.dataset}): {exc}") from exc
            status.rollback(mark)
            skipped.append({"sample_id": sample.sample_id, "dataset": sample.dataset, "reason": str(exc)})
            log.warning("skipping sample %s of dataset %s: %s", sample.sample_id, sample.dataset, exc)
            continue
        packed.append(sample)
        tokens_per_group[sample.group] += length
        samples_per_group[sample.group] += 1
        tokens_per_dataset[sample.dataset] += length

    if not packed:
        raise PackingError(f"no sample of this pack could be decoded: {skipped}")
    samples = packed
    sequence_length = sum(status.sample_lens)
    if sequence_length > config.max_num_tokens and config.use_flex:
        planned = sum(s.num_tokens for s in samples)
        why = ("the samples' stored num_tokens already add up to more: the caller packed too many samples"
               if planned > config.max_num_tokens else
               f"their stored num_tokens add up to {planned}, so they disagree with this tokenizer or these "
               f"transforms; re-ingest with the training tokenizer")
        raise PackingError(f"pack of {len(samples)} samples has {sequence_length} tokens > max_num_tokens "
                           f"{config.max_num_tokens}, which flex mode cannot pad: {why}")
    sample_lens = list(status.sample_lens)
    split_lens = list(status.split_lens)
    attn_modes = list(status.attn_modes)
    if config.use_flex:
        pad = config.max_num_tokens - sequence_length
        split_lens.append(pad)
        attn_modes.append("causal")
        sample_lens.append(pad)

    batch = PackedBatch(
        sequence_length=sequence_length,
        sample_lens=sample_lens,
        packed_text_ids=_long(status.packed_text_ids),
        packed_text_indexes=_long(status.packed_text_indexes),
        packed_position_ids=_long(status.packed_position_ids),
        split_lens=split_lens,
        attn_modes=attn_modes,
        nested_attention_masks=(status.nested_attention_masks
                                if not config.use_flex and config.build_nested_masks else None),
    )
    if status.vae_images:
        max_h = max(t.shape[0] for t in status.vae_images)
        max_w = max(t.shape[1] for t in status.vae_images)
        padded = torch.empty((len(status.vae_images), 3, max_h, max_w), dtype=torch.float32)
        for i, pixels in enumerate(status.vae_images):   # each element written once: image, then zero margins
            h, w = pixels.shape[0], pixels.shape[1]
            normalise_(padded[i, :, :h, :w].copy_(pixels.permute(2, 0, 1)))
            padded[i, :, :h, w:] = 0
            padded[i, :, h:, :] = 0
        batch.padded_images = padded
        batch.patchified_vae_latent_shapes = list(status.vae_latent_shapes)
        batch.packed_latent_position_ids = torch.cat(status.latent_position_ids).long()
        batch.packed_vae_token_indexes = _long(status.vae_token_indexes)
    if status.vit_tokens:
        batch.packed_vit_tokens = normalise_(torch.cat(status.vit_tokens, dim=0).float())
        batch.packed_vit_position_ids = torch.cat(status.vit_position_ids).long()
        batch.packed_vit_token_indexes = _long(status.vit_token_indexes)
        batch.vit_token_seqlens = _long(status.vit_token_seqlens)
    if status.timesteps:
        batch.packed_timesteps = torch.tensor(status.timesteps, dtype=torch.float32)
        batch.mse_loss_indexes = _long(status.mse_loss_indexes)
    if status.label_ids:
        batch.packed_label_ids = _long(status.label_ids)
        batch.ce_loss_indexes = _long(status.ce_loss_indexes)
        batch.ce_loss_weights = torch.tensor(status.ce_loss_weights, dtype=torch.float32)

    batch.batch_data_indexes = [
        {"sample_id": s.sample_id, "dataset": s.dataset, "group": s.group, "draw_key": s.draw_key} for s in samples
    ]
    batch.metrics = {
        "num_tokens": sequence_length,
        "max_num_tokens": config.max_num_tokens,
        "packing_efficiency": sequence_length / config.max_num_tokens,
        "num_samples": len(samples),
        "planned_tokens": int(sum(s.num_tokens for s in samples)),
        "tokens_per_group": dict(tokens_per_group),
        "samples_per_group": dict(samples_per_group),
        "tokens_per_dataset": dict(tokens_per_dataset),
        "ce_tokens": len(status.ce_loss_indexes),
        "mse_tokens": len(status.mse_loss_indexes),
        "text_tokens": len(status.packed_text_ids),
        "vit_tokens": len(status.vit_token_indexes),
        "vae_tokens": len(status.vae_token_indexes),
        "cfg_dropped": dict(status.dropped),
        "skipped_samples": skipped,
    }
    return batch
