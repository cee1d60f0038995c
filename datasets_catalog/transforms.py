"""The upstream image resize rule (docs/upstream-compat.md#resize-rule), shared by ingest, stream and inference.

Only integer sizes are computed here; pixels are resized elsewhere. The rule must match upstream
bit for bit because shards store its results and checkpoints were trained on them.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any

VAE_DOWNSAMPLE = 16  # FLUX VAE 8x, then 2x2 latent patches
VIT_PATCH = 14


@dataclass(frozen=True)
class ImageTransformArgs:
    """Arguments of upstream `ImageTransform`; YAML keys use the upstream names."""

    max_image_size: int
    min_image_size: int
    image_stride: int
    max_pixels: int = 14 * 14 * 9 * 1024  # upstream constructor default: 1,806,336

    def __post_init__(self) -> None:
        for name in ("max_image_size", "min_image_size", "image_stride", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_image_size > self.max_image_size:
            raise ValueError(
                f"min_image_size ({self.min_image_size}) is larger than max_image_size ({self.max_image_size})"
            )

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, default: "ImageTransformArgs") -> "ImageTransformArgs":
        """Build from a YAML mapping, filling omitted keys from `default`; unknown keys are an error."""
        if data is None:
            return default
        if not isinstance(data, dict):
            raise ValueError(f"transform args must be a mapping, got {type(data).__name__}")
        unknown = set(data) - set(asdict(default))
        if unknown:
            raise ValueError(
                f"unknown transform arg(s) {sorted(unknown)}; allowed: {sorted(asdict(default))}"
            )
        return cls(**{**asdict(default), **data})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        return resize_target(width, height, self, img_num)


# Defaults of the UniMedVL SFT example (docs/upstream-compat.md#dataset-yaml).
DEFAULT_VAE_ARGS = ImageTransformArgs(max_image_size=1024, min_image_size=512, image_stride=16)
DEFAULT_VIT_ARGS = ImageTransformArgs(
    max_image_size=980, min_image_size=378, image_stride=14, max_pixels=2_007_040
)


def _make_divisible(value: float, stride: int) -> int:
    # Python's round() (banker's rounding) is what upstream uses; keep it for identical sizes.
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: float, height: float, scale: float, stride: int) -> tuple[int, int]:
    new_w = _make_divisible(round(width * scale), stride)
    new_h = _make_divisible(round(height * scale), stride)
    return new_w, new_h


def resize_target(width: int, height: int, args: ImageTransformArgs, img_num: int = 1) -> tuple[int, int]:
    """(width, height) the upstream MaxLongEdgeMinShortEdgeResize produces for an image of this size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(args.max_image_size / max(width, height), 1.0)
    scale = max(scale, args.min_image_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, args.image_stride)

    budget = args.max_pixels / img_num
    if new_w * new_h > budget:
        # Quirk (kept for data compatibility): the per-side factor is the *area* ratio, not its square
        # root, so images shrink more than needed. Checkpoints were trained on these sizes.
        scale = budget / (new_w * new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, args.image_stride)

    if max(new_w, new_h) > args.max_image_size:
        scale = args.max_image_size / max(new_w, new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, args.image_stride)
    return new_w, new_h


def vae_tokens(width: int, height: int) -> int:
    """Latent tokens of a VAE image already resized to (width, height)."""
    return (width // VAE_DOWNSAMPLE) * (height // VAE_DOWNSAMPLE)


def vit_tokens(width: int, height: int, patch: int = VIT_PATCH) -> int:
    """ViT patch tokens of an image already resized to (width, height)."""
    return (width // patch) * (height // patch)
