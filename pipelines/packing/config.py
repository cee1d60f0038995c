"""Packing settings (docs/upstream-compat.md#data-arguments, #pack-membership), shared by the stream, the packer and jobs."""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Literal


@dataclass(frozen=True)
class PackingConfig:
    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50
    text_cond_dropout_prob: float = 0.1
    vit_cond_dropout_prob: float = 0.4   # DataConfig default when visual_gen is off; see trainer for the pitfall
    vae_cond_dropout_prob: float = 0.1
    use_flex: bool = False               # pad to max_num_tokens and emit split_lens/attn_modes only
    interpolate_pos: bool = False
    vit_patch_size: int = 14
    vit_max_num_patch_per_side: int = 70
    latent_patch_size: int = 2
    max_latent_size: int = 32
    len2weight_mode: Literal["token", "sample", "square"] = "square"
    build_nested_masks: bool = True      # dense per-sample masks (SDPA path); off for flash/flex-only runs
    jpeg_draft: bool = False             # decode JPEGs >= 2x the largest target at reduced DCT scale (not upstream-exact)

    def __post_init__(self) -> None:
        if self.expected_num_tokens > self.max_num_tokens:
            raise ValueError(
                f"expected_num_tokens ({self.expected_num_tokens}) must not exceed max_num_tokens ({self.max_num_tokens})"
            )
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            raise ValueError(
                f"max_num_tokens_per_sample ({self.max_num_tokens_per_sample}) must not exceed "
                f"max_num_tokens ({self.max_num_tokens})"
            )
        for name in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")

    def to_dict(self) -> dict:
        return asdict(self)
