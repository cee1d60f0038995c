"""`PackedBatch`: one packed sequence, carrying the fields of docs/upstream-compat.md#packedbatch-fields under their upstream names.

This is the seam between the packer and the model; the model never receives a dict of lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class PackedBatch:
    sequence_length: int
    sample_lens: list[int]
    packed_text_ids: torch.Tensor            # [N_txt] long
    packed_text_indexes: torch.Tensor        # [N_txt] long
    packed_position_ids: torch.Tensor        # [L] long
    # attention: nested masks (non-flex) and/or split_lens + attn_modes (flex / varlen)
    split_lens: list[int]
    attn_modes: list[str]                    # "causal" | "full" | "noise"
    nested_attention_masks: list[torch.Tensor] | None = None
    # ViT (understanding) inputs
    packed_vit_tokens: torch.Tensor | None = None          # [N_vit, 14*14*3]
    vit_token_seqlens: torch.Tensor | None = None          # [n_img] int
    packed_vit_position_ids: torch.Tensor | None = None    # [N_vit]
    packed_vit_token_indexes: torch.Tensor | None = None   # [N_vit]
    # VAE (generation) inputs
    padded_images: torch.Tensor | None = None               # [n_vae, 3, Hmax, Wmax] in [-1, 1]
    patchified_vae_latent_shapes: list[tuple[int, int]] = field(default_factory=list)
    packed_latent_position_ids: torch.Tensor | None = None  # [N_vae]
    packed_vae_token_indexes: torch.Tensor | None = None    # [N_vae]
    packed_timesteps: torch.Tensor | None = None            # [N_vae] float, -inf = clean
    mse_loss_indexes: torch.Tensor | None = None            # [N_mse]
    # text targets
    packed_label_ids: torch.Tensor | None = None            # [N_ce]
    ce_loss_indexes: torch.Tensor | None = None             # [N_ce]
    ce_loss_weights: torch.Tensor | None = None             # [N_ce] trainer only
    # bookkeeping (never used by the model)
    batch_data_indexes: list[dict[str, Any]] = field(default_factory=list)  # per sample: sample_id, dataset, group
    metrics: dict[str, Any] = field(default_factory=dict)   # packing efficiency, tokens per group, skipped
    # the stream's state_dict() right after this batch was produced: saving it with the last *consumed*
    # batch keeps resume exact even when batches are prefetched in the background
    stream_state: dict[str, Any] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor moved to `device` (lists of tensors included)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                changes[f.name] = [v.to(device, non_blocking=non_blocking) for v in value]
        return replace(self, **changes)

    def pin_memory(self) -> "PackedBatch":
        changes = {f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    @property
    def num_ce_tokens(self) -> int:
        return 0 if self.ce_loss_indexes is None else int(self.ce_loss_indexes.numel())

    @property
    def num_mse_tokens(self) -> int:
        return 0 if self.mse_loss_indexes is None else int(self.mse_loss_indexes.numel())

    @property
    def has_vit(self) -> bool:
        return self.packed_vit_tokens is not None and self.packed_vit_tokens.numel() > 0

    @property
    def has_vae(self) -> bool:
        return self.padded_images is not None and self.padded_images.numel() > 0
