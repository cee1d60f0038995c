"""Pre-resized pixels: decode and resize once at ingest, so the training loader does neither.

A `store_pixels` dataset keeps, next to each image's original bytes, the image already converted to RGB
(transparency over white) and resized to its VAE and ViT targets (PIL bicubic, the upstream transform), as
raw row-major HWC uint8 (`vae_pixels`, `vit_pixels` in the shard's image struct). Decoding and resizing
are most of the loader's CPU time (docs/mixture.md, "Tests and benchmark"); a stored image only needs the
[-1, 1] normalisation, which the packer shares with the decode path, so both give bit-identical tensors.

The cost is disk: width x height x 3 bytes per target (a 1024x1024 VAE target is 3 MB). The pixels are
only used when their size is still the row's target: a mixture config with other transform args makes
the stream recompute the targets, drop the stored pixels (pipelines.mixture.recompute) and decode again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.imaging.decode import ImageDecodeError, load_image_rgb, resize_rgb, rgb_array_to_tensor
from pipelines.storage.shard_schema import PIXEL_FIELDS  # noqa: F401  (re-exported: the fields this module fills and reads)


def resized_pixels(data: bytes | None, path: Path | str | None, meta: str | None,
                   sizes: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """{"vae_pixels": ..., "vit_pixels": ...}: one decode, one resize per target (name -> (width, height)).

    Raises ImageDecodeError for bytes the header probe accepted but that do not decode (a corrupt body)."""
    image = load_image_rgb(data, path, meta)
    out = {}
    for which, (width, height) in sizes.items():
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"cannot store {which} pixels of target size {width}x{height}")
        out[f"{which}_pixels"] = np.asarray(resize_rgb(image, width, height), dtype=np.uint8).tobytes()
    return out


def stored_pixels(record: dict, which: str) -> np.ndarray | None:
    """[H, W, 3] uint8 (writable) from the image struct's stored `which` pixels, or None when there are none
    or they do not have the struct's current target size (recomputed transforms): the caller decodes then."""
    data = record.get(f"{which}_pixels")
    if data is None:
        return None
    width, height = int(record.get(f"{which}_width") or 0), int(record.get(f"{which}_height") or 0)
    if width <= 0 or height <= 0 or len(data) != width * height * 3:
        return None
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(height, width, 3)


def stored_pixels_tensor(record: dict, which: str) -> torch.Tensor | None:
    """The [3, H, W] tensor in [-1, 1] of the stored pixels (None as for `stored_pixels`)."""
    array = stored_pixels(record, which)
    return None if array is None else rgb_array_to_tensor(array)
