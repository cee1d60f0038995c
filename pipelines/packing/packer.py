"""Packing: a list of drawn samples -> one `PackedBatch` with upstream `pack_sequence` semantics.

docs/upstream-compat.md#pack-sequence, #packedbatch-fields, #attention-masks. The sequence plan of a
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
from typing import Any, Callable, Sequence

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
    """The docs/upstream-compat.md#sequence-plans plan of a drawn sample (built by datasets_catalog.plan, never re-derived here)."""
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


class _SampleWriter:
    """Appends one sample's plan to the pack's `_Status` exactly as upstream pack_sequence does.

    Holds the per-sample cursor: `curr` (next index in the pack), `rope` (next position id), the length of
    the open split, the splits and attention modes so far, and the timestep shared by a split's frames.
    Plan items may carry `split_start`, `split_end` and `frame_delta` (custom plans: one split over several
    video frames); plain `PlanItem`s are one split each.
    """

    def __init__(self, sample: StreamSample, status: _Status, config: PackingConfig, tokenizer: TextTokenizer,
                 seed: int) -> None:
        self.sample = sample
        self.status = status
        self.config = config
        self.special = tokenizer.special
        self.cfg_rng = sample_generator(seed, sample.draw_key, CFG)
        self.t_rng = sample_generator(seed, sample.draw_key, TIMESTEP)
        self.images = _SampleImages(sample, config.jpeg_draft)
        self.curr = status.curr
        self.rope = 0
        self.split_len = 0
        self.sample_len = 0
        self.split_lens: list[int] = []
        self.attn_modes: list[str] = []
        self.timestep = float("-inf")

    def write(self, plan: SamplePlan, text_ids: list[list[int]]) -> int:
        """Every item of `plan` (`text_ids`: one id list per text item, in plan order); returns the length."""
        texts = iter(text_ids)
        for item in plan.items:
            if getattr(item, "split_start", True):
                self.split_len = 0
            if item.type == "text":
                placed = self._text(item, next(texts))
            elif item.type == "vit_image":
                placed = self._vit(item)
            elif item.type == "vae_image":
                placed = self._vae(item)
            else:  # pragma: no cover - PlanItem.type is a closed set
                raise PackingError(f"unknown plan item type {item.type!r}")
            if placed and getattr(item, "split_end", True):   # a CFG-dropped item closes no split
                self.split_lens.append(self.split_len)
                self.sample_len += self.split_len
        return self._close()

    def _close(self) -> int:
        status = self.status
        status.curr = self.curr
        status.sample_lens.append(self.sample_len)
        status.split_lens.extend(self.split_lens)
        status.attn_modes.extend(self.attn_modes)
        if not self.config.use_flex and self.config.build_nested_masks:
            status.nested_attention_masks.append(prepare_attention_mask_per_sample(self.split_lens, self.attn_modes))
        return self.sample_len

    def _advance(self, n: int) -> None:
        self.curr += n
        self.split_len += n

    def _special_token(self, token: int, item: PlanItem | None = None) -> None:
        """One special token (eos, start/end of image) at `curr`, with its CE target when
        `item.special_token_loss`."""
        status = self.status
        status.packed_text_ids.append(token)
        status.packed_text_indexes.append(self.curr)
        if item is not None and item.special_token_loss == 1:
            status.ce_loss_indexes.append(self.curr)
            status.ce_loss_weights.append(1.0)
            status.label_ids.append(item.special_token_label)
        self._advance(1)

    def _cfg_drop(self, item: PlanItem, p: float) -> bool:
        # one uniform per enable_cfg element, in plan order; never a draw (nor a drop) when enable_cfg=0
        return item.enable_cfg == 1 and float(self.cfg_rng.random()) < p

    def _text(self, item: PlanItem, ids: list[int]) -> bool:
        """`<bos> ids <eos>`, causal; with loss, the targets are the ids shifted by one and `<eos>`."""
        status, config = self.status, self.config
        if self._cfg_drop(item, config.text_cond_dropout_prob):
            status.dropped["text"] += 1
            return False
        shifted = [self.special.bos, *ids]
        status.packed_text_ids.extend(shifted)
        status.packed_text_indexes.extend(range(self.curr, self.curr + len(shifted)))
        if item.loss == 1:
            status.ce_loss_indexes.extend(range(self.curr, self.curr + len(shifted)))
            status.ce_loss_weights.extend([len2weight(len(shifted), config.len2weight_mode)] * len(shifted))
            status.label_ids.extend([*ids, self.special.eos])
        self._advance(len(shifted))
        self._special_token(self.special.eos, item)
        self.attn_modes.append("causal")
        status.packed_position_ids.extend(range(self.rope, self.rope + self.split_len))
        self.rope += self.split_len
        return True

    def _image(self, item: PlanItem, which: str, dropout_prob: float,
               add_tokens: Callable[[PlanItem, torch.Tensor], int]) -> int | None:
        """What ViT and VAE elements share: CFG dropout (the image still takes one position), then
        `<start_of_image>`, the tokens `add_tokens` appends from `curr` on, `<end_of_image>`.
        Returns the number of image tokens, None when dropped."""
        if self._cfg_drop(item, dropout_prob):
            self.status.dropped[which] += 1
            self.rope += 1
            return None
        pixels = self.images.pixels(item.image, which)
        self._special_token(self.special.start_of_image)
        n = add_tokens(item, pixels)
        self._advance(n)
        self._special_token(self.special.end_of_image, item)
        return n

    def _vit(self, item: PlanItem) -> bool:
        """A ViT image: full attention, every token of the split at one position."""
        if self._image(item, "vit", self.config.vit_cond_dropout_prob, self._vit_tokens) is None:
            return False
        self.attn_modes.append("full")
        self.status.packed_position_ids.extend([self.rope] * self.split_len)
        self.rope += 1
        return True

    def _vit_tokens(self, item: PlanItem, pixels: torch.Tensor) -> int:
        status, config = self.status, self.config
        tokens = patchify_hwc(pixels, config.vit_patch_size)   # uint8; normalised once per pack
        n = tokens.shape[0]
        status.vit_token_indexes.extend(range(self.curr, self.curr + n))
        status.vit_tokens.append(tokens)
        status.vit_token_seqlens.append(n)
        status.vit_position_ids.append(_grid_position_ids(
            self.sample.sample_id, "ViT patch", pixels.shape[0], pixels.shape[1], config.vit_patch_size,
            config.vit_max_num_patch_per_side, "vit_max_num_patch_per_side", config.interpolate_pos)[2])
        return n

    def _vae(self, item: PlanItem) -> bool:
        """A VAE image: "noise" attention when it is a target (a clean context image, or a frame, is "full");
        it takes one position, or `frame_delta` for frames; a target keeps the next one."""
        n = self._image(item, "vae", self.config.vae_cond_dropout_prob, self._vae_tokens)
        if n is None:
            return False
        frame_delta = getattr(item, "frame_delta", None)
        if getattr(item, "split_start", True):
            self.attn_modes.append("noise" if item.loss == 1 and frame_delta is None else "full")
        self.status.packed_position_ids.extend([self.rope] * (n + 2))
        if frame_delta is not None:
            self.rope += frame_delta
        elif item.loss == 0:
            self.rope += 1
        return True

    def _vae_tokens(self, item: PlanItem, pixels: torch.Tensor) -> int:
        status, config = self.status, self.config
        status.vae_images.append(pixels)   # uint8 [H, W, 3]; normalised into the padded batch
        downsample = config.latent_patch_size * (VAE_DOWNSAMPLE // 2)  # FLUX 8x times the latent patch
        h, w, ids = _grid_position_ids(self.sample.sample_id, "VAE latent", pixels.shape[0], pixels.shape[1],
                                       downsample, config.max_latent_size, "max_latent_size", config.interpolate_pos)
        status.latent_position_ids.append(ids)
        status.vae_latent_shapes.append((h, w))
        n = h * w
        status.vae_token_indexes.extend(range(self.curr, self.curr + n))
        if item.loss == 1:
            status.mse_loss_indexes.extend(range(self.curr, self.curr + n))
            if getattr(item, "split_start", True):  # one draw per split: frames of a multi-frame split share it
                self.timestep = float(self.t_rng.standard_normal())
        else:
            self.timestep = float("-inf")
        status.timesteps.extend([self.timestep] * n)
        return n


def _long(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))   # ~2x faster than torch.tensor(list)


def build_packed_batch(samples: Sequence[StreamSample], config: PackingConfig, tokenizer: TextTokenizer,
                       seed: int, *, on_image_error: str = "skip") -> PackedBatch:
    """Materialise one pack: plans -> text ids, images, masks, position ids and targets (`PackedBatch`).

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
    status = _Status()
    packed, skipped = _pack_samples(samples, plans, status, config, tokenizer, seed, on_image_error)
    sequence_length = sum(status.sample_lens)
    _check_flex_fits(sequence_length, [s for s, _ in packed], config)
    batch = _sequence_fields(status, sequence_length, config)
    _add_vae_fields(batch, status)
    _add_vit_fields(batch, status)
    _add_loss_fields(batch, status)
    batch.batch_data_indexes = [
        {"sample_id": s.sample_id, "dataset": s.dataset, "group": s.group, "draw_key": s.draw_key} for s, _ in packed
    ]
    batch.metrics = _metrics(status, packed, skipped, sequence_length, config)
    return batch


def _pack_samples(samples: Sequence[StreamSample], plans: Sequence[SamplePlan], status: _Status,
                  config: PackingConfig, tokenizer: TextTokenizer, seed: int,
                  on_image_error: str) -> tuple[list[tuple[StreamSample, int]], list[dict[str, str]]]:
    """Write every sample into `status`; returns the (sample, length) pairs packed and the samples skipped
    for an unreadable image (rolled back)."""
    all_texts = [item.text or "" for plan in plans for item in plan.items if item.type == "text"]
    encoded = iter(tokenizer.encode_batch(all_texts) if all_texts else [])
    packed: list[tuple[StreamSample, int]] = []
    skipped: list[dict[str, str]] = []
    for sample, plan in zip(samples, plans):
        text_ids = [list(next(encoded)) for item in plan.items if item.type == "text"]
        mark = status.mark()
        try:
            length = _SampleWriter(sample, status, config, tokenizer, seed).write(plan, text_ids)
        except ImageDecodeError as exc:
            if on_image_error == "raise":
                raise PackingError(f"sample {sample.sample_id} (dataset {sample.dataset}): {exc}") from exc
            status.rollback(mark)
            skipped.append({"sample_id": sample.sample_id, "dataset": sample.dataset, "reason": str(exc)})
            log.warning("skipping sample %s of dataset %s: %s", sample.sample_id, sample.dataset, exc)
            continue
        packed.append((sample, length))
    if not packed:
        raise PackingError(f"no sample of this pack could be decoded: {skipped}")
    return packed, skipped


def _check_flex_fits(sequence_length: int, samples: list[StreamSample], config: PackingConfig) -> None:
    """Flex mode pads to max_num_tokens, so a longer pack is an error that says whose numbers are off."""
    if sequence_length > config.max_num_tokens and config.use_flex:
        planned = sum(s.num_tokens for s in samples)
        why = ("the samples' stored num_tokens already add up to more: the caller packed too many samples"
               if planned > config.max_num_tokens else
               f"their stored num_tokens add up to {planned}, so they disagree with this tokenizer or these "
               f"transforms; re-ingest with the training tokenizer")
        raise PackingError(f"pack of {len(samples)} samples has {sequence_length} tokens > max_num_tokens "
                           f"{config.max_num_tokens}, which flex mode cannot pad: {why}")


def _sequence_fields(status: _Status, sequence_length: int, config: PackingConfig) -> PackedBatch:
    """The batch with its text ids, position ids and attention layout (flex mode: padded by one causal split)."""
    sample_lens = list(status.sample_lens)
    split_lens = list(status.split_lens)
    attn_modes = list(status.attn_modes)
    if config.use_flex:
        pad = config.max_num_tokens - sequence_length
        split_lens.append(pad)
        attn_modes.append("causal")
        sample_lens.append(pad)
    return PackedBatch(
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


def _add_vae_fields(batch: PackedBatch, status: _Status) -> None:
    """VAE images padded to the largest one and normalised to [-1, 1], their latent grids and indexes."""
    if not status.vae_images:
        return
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


def _add_vit_fields(batch: PackedBatch, status: _Status) -> None:
    """ViT tokens of the pack, normalised to [-1, 1] at once, with their positions and per-image lengths."""
    if not status.vit_tokens:
        return
    batch.packed_vit_tokens = normalise_(torch.cat(status.vit_tokens, dim=0).float())
    batch.packed_vit_position_ids = torch.cat(status.vit_position_ids).long()
    batch.packed_vit_token_indexes = _long(status.vit_token_indexes)
    batch.vit_token_seqlens = _long(status.vit_token_seqlens)


def _add_loss_fields(batch: PackedBatch, status: _Status) -> None:
    """MSE targets (timesteps of the VAE tokens) and CE targets (labels, indexes, weights)."""
    if status.timesteps:
        batch.packed_timesteps = torch.tensor(status.timesteps, dtype=torch.float32)
        batch.mse_loss_indexes = _long(status.mse_loss_indexes)
    if status.label_ids:
        batch.packed_label_ids = _long(status.label_ids)
        batch.ce_loss_indexes = _long(status.ce_loss_indexes)
        batch.ce_loss_weights = torch.tensor(status.ce_loss_weights, dtype=torch.float32)


def _metrics(status: _Status, packed: list[tuple[StreamSample, int]], skipped: list[dict[str, str]],
             sequence_length: int, config: PackingConfig) -> dict[str, Any]:
    tokens_per_group: dict[str, int] = defaultdict(int)
    samples_per_group: dict[str, int] = defaultdict(int)
    tokens_per_dataset: dict[str, int] = defaultdict(int)
    for sample, length in packed:
        tokens_per_group[sample.group] += length
        samples_per_group[sample.group] += 1
        tokens_per_dataset[sample.dataset] += length
    return {
        "num_tokens": sequence_length,
        "max_num_tokens": config.max_num_tokens,
        "packing_efficiency": sequence_length / config.max_num_tokens,
        "num_samples": len(packed),
        "planned_tokens": int(sum(s.num_tokens for s, _ in packed)),
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
