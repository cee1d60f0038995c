"""Small pure tensor helpers of the packer with their upstream names (docs/upstream-compat.md#patchify)."""
from __future__ import annotations

import torch


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C]; patches row-major, inside a token (row-in-patch, col-in-patch, channel).

    This column order matches the ViT patch embedding converted from Conv2d to Linear (docs/upstream-compat.md#checkpoint-loading).
    """
    p = patch_size
    c, h, w = image.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {p}")
    image = image.reshape(c, h // p, p, w // p, p)
    image = torch.einsum("chpwq->hwpqc", image)
    return image.reshape(-1, p * p * c)


def patchify_hwc(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[H, W, C] (any dtype) -> [(H/p)*(W/p), p*p*C]: the token layout of `patchify` on the [C, H, W] image.

    The packer patchifies uint8 pixels and normalises all ViT tokens of a pack at once (a quarter of the
    bytes moved per step)."""
    p = patch_size
    h, w, c = pixels.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {p}")
    return pixels.reshape(h // p, p, w // p, p, c).permute(0, 2, 1, 3, 4).reshape(-1, p * p * c)


def len2weight(x: int, mode: str = "square") -> float:
    """CE weight of each target token of a text of x targets (upstream passes text length + 1)."""
    if x == 0:
        return 0.0
    if mode == "token":
        return 1.0
    if mode == "sample":
        return 1.0 / x
    if mode == "square":
        return 1.0 / (x ** 0.5)
    raise ValueError(f"unknown len2weight mode {mode!r}; expected token, sample or square")
