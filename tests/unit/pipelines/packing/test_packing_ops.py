"""patchify, len2weight and 2-D position ids (docs/upstream-compat.md#patchify), against formulas written out here."""
from __future__ import annotations

import math

import pytest
import torch

from pipelines.packing.packer import (
    get_flattened_position_ids_extrapolate, get_flattened_position_ids_interpolate, len2weight, patchify,
)
from pipelines.packing.ops import patchify_hwc


def test_patchify_order_is_row_major_patches_then_row_col_channel():
    c, h, w, p = 3, 4, 6, 2
    image = torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w)
    tokens = patchify(image, p)
    assert tokens.shape == ((h // p) * (w // p), p * p * c)
    for token in range(tokens.shape[0]):
        pr, pc = divmod(token, w // p)           # patches row-major
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    assert tokens[token, (i * p + j) * c + ch] == image[ch, pr * p + i, pc * p + j]


@pytest.mark.parametrize("h,w,p", [(28, 42, 14), (4, 6, 2), (14, 14, 14)])
def test_patchify_hwc_matches_patchify_of_the_chw_image(h, w, p):
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    assert torch.equal(patchify_hwc(pixels, p), patchify(pixels.permute(2, 0, 1), p))
    with pytest.raises(ValueError, match="divisible"):
        patchify_hwc(pixels[1:], p)


def test_patchify_refuses_sizes_not_divisible():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(3, 15, 14), 14)


def test_len2weight_modes():
    assert len2weight(0) == 0
    assert len2weight(9, "token") == 1.0
    assert len2weight(4, "sample") == 0.25
    assert math.isclose(len2weight(16, "square"), 0.25) and math.isclose(len2weight(5), 1 / math.sqrt(5))
    with pytest.raises(ValueError):
        len2weight(3, "cube")


def test_extrapolate_ids():
    ids = get_flattened_position_ids_extrapolate(2 * 14, 3 * 14, 14, 70)
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]


def test_interpolate_ids():
    M = 4
    # a grid as large as the table is the identity mapping
    assert torch.equal(get_flattened_position_ids_interpolate(64, 64, 16, M),
                       get_flattened_position_ids_extrapolate(64, 64, 16, M))
    # a 2 x 3 grid spreads over the 4 x 4 table: coordinates k/n bucketed at 1/4, 2/4, 3/4
    ids = get_flattened_position_ids_interpolate(2, 3, 1, M)
    rows = [math.floor(k / 2 * M) for k in range(2)]        # 0, 2
    cols = [math.floor(k / 3 * M) for k in range(3)]        # 0, 1, 2
    assert ids.tolist() == [r * M + c for r in rows for c in cols]
    # never leaves the table, whatever the grid size
    big = get_flattened_position_ids_interpolate(200, 130, 1, 8)
    assert big.max() < 64 and big.min() == 0


def test_sizes_not_divisible_by_the_patch_use_whole_patches_only():
    # 30 x 44 px with 14-px patches: 30 // 14 = 2 rows, 44 // 14 = 3 columns (the remainders are cropped)
    assert get_flattened_position_ids_extrapolate(30, 44, 14, 4).tolist() == [0, 1, 2, 4, 5, 6]
    # interpolate: rows at 0, 1/2 -> buckets 0, 2; columns at 0, 1/3, 2/3 -> buckets 0, 1, 2 (table side 4)
    assert get_flattened_position_ids_interpolate(30, 44, 14, 4).tolist() == [0, 1, 2, 8, 9, 10]


def test_the_switch_picks_extrapolate_by_default():
    from pipelines.packing.position_ids import get_flattened_position_ids

    assert get_flattened_position_ids(28, 42, 14, 4).tolist() == [0, 1, 2, 4, 5, 6]
    assert get_flattened_position_ids(28, 42, 14, 4, interpolate=False).tolist() == [0, 1, 2, 4, 5, 6]
    assert get_flattened_position_ids(28, 42, 14, 4, interpolate=True).tolist() == [0, 1, 2, 8, 9, 10]
