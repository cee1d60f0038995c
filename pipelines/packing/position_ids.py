"""Flattened 2-D position ids of ViT patches and VAE latents (docs/upstream-compat.md#patchify).

Both index a fixed `M x M` table (M = max patches per side): row * M + col. `extrapolate` uses the raw
grid coordinates, `interpolate` (config `interpolate_pos`) maps the grid onto the table by buckets.
"""
from __future__ import annotations

import torch


def get_flattened_position_ids_extrapolate(img_h: int, img_w: int, patch_size: int,
                                           max_num_patches_per_side: int) -> torch.Tensor:
    """id = r * M + c over the (img_h // p) x (img_w // p) grid, row-major."""
    num_h, num_w = img_h // patch_size, img_w // patch_size
    coords_h = torch.arange(0, num_h)
    coords_w = torch.arange(0, num_w)
    return (coords_h[:, None] * max_num_patches_per_side + coords_w).flatten()


def get_flattened_position_ids_interpolate(img_h: int, img_w: int, patch_size: int,
                                           max_num_patches_per_side: int) -> torch.Tensor:
    """Fractional coordinates k/n bucketed by the M - 1 boundaries 1/M, 2/M, ... (right side)."""
    num_h, num_w = img_h // patch_size, img_w // patch_size
    boundaries = torch.arange(1 / max_num_patches_per_side, 1.0, 1 / max_num_patches_per_side)
    frac_h = torch.arange(0, 1 - 1e-6, 1 / num_h)
    frac_w = torch.arange(0, 1 - 1e-6, 1 / num_w)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    return (bucket_h[:, None] * max_num_patches_per_side + bucket_w).flatten()


def get_flattened_position_ids(img_h: int, img_w: int, patch_size: int, max_num_patches_per_side: int,
                               interpolate: bool = False) -> torch.Tensor:
    """The function upstream picks with `interpolate_pos`."""
    fn = get_flattened_position_ids_interpolate if interpolate else get_flattened_position_ids_extrapolate
    return fn(img_h, img_w, patch_size, max_num_patches_per_side)
