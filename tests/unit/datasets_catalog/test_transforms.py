"""The upstream resize rule (docs/upstream-compat.md#resize-rule) against sizes computed by hand, quirks included."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from datasets_catalog.records import vit_img_num
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.transforms import (DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS, ImageTransformArgs, resize_target,
                                         vae_tokens, vit_tokens)


@pytest.mark.parametrize("size, args, img_num, expected", [
    # 2000x1000, VAE 1024/512/16: s = max(min(1024/2000, 1), 512/1000) = 0.512 -> 1024x512, under the budget.
    ((2000, 1000), DEFAULT_VAE_ARGS, 1, (1024, 512)),
    # 100x50 is upscaled: s = max(1, 512/50) = 10.24 -> 1024x512.
    ((100, 50), DEFAULT_VAE_ARGS, 1, (1024, 512)),
    # 980x980, ViT 980/378/14, max_pixels 2,007,040: 960,400 px fits one image's budget...
    ((980, 980), DEFAULT_VIT_ARGS, 1, (980, 980)),
    # ...and half of it (img_num=2: 1,003,520)...
    ((980, 980), DEFAULT_VIT_ARGS, 2, (980, 980)),
    # ...but not a third (668,906.67): the AREA ratio 0.69649 is applied per side (the quirk):
    # 980 * 0.69649 = 682.56 -> 683 -> 683/14 = 48.79 -> 49 * 14 = 686. (sqrt would give 812.)
    ((980, 980), DEFAULT_VIT_ARGS, 3, (686, 686)),
    # 1500x1500, ViT, img_num=4: 980x980 after step 1; budget 501,760; ratio 0.52245 -> 512.0 -> 36.57 -> 37 -> 518.
    ((1500, 1500), DEFAULT_VIT_ARGS, 4, (518, 518)),
    # 1600x1600 with max 2048 (VAE, default max_pixels 1,806,336): 2,560,000 px > budget; ratio 0.7056:
    # 1600 * 0.7056 = 1128.96 -> 1129 -> 70.56 -> 71 * 16 = 1136. (sqrt would give 1344.)
    ((1600, 1600), ImageTransformArgs(max_image_size=2048, min_image_size=512, image_stride=16), 1, (1136, 1136)),
    # 4000x100, VAE: step 1 gives s = 5.12 -> 20480x512 (10,485,760 px); ratio 0.172265625 ->
    # 3528.0 / 16 = 220.5 -> banker's round 220 -> 3520; 88.2 -> 88 / 16 = 5.5 -> 6 -> 96;
    # step 3: long side 3520 > 1024 -> 1024 and 96 * 0.2909 = 27.93 -> 28 / 16 = 1.75 -> 2 -> 32.
    # (Round-half-up would give 3536 in step 2, but step 3 rescales it to 1024 too: this case does not pin
    # banker's rounding; the cases of test_bankers_rounding_decides_the_size do.)
    ((4000, 100), DEFAULT_VAE_ARGS, 1, (1024, 32)),
    # Tiny image, ViT: 10x10 -> s = 37.8 -> 378x378 (27 * 14), under the budget.
    ((10, 10), DEFAULT_VIT_ARGS, 1, (378, 378)),
])
def test_resize_rule_hand_computed(size, args, img_num, expected):
    assert resize_target(*size, args, img_num) == expected


# Cases where Python's round-half-to-even (banker's rounding, what upstream's `round()` does) decides the final
# size: round-half-up gives the size in the last column. Every step computed by hand (ratios to 6 digits).
@pytest.mark.parametrize("size, args, img_num, expected, half_up", [
    # 27x700, VAE 1024/512/16, max_pixels 1,806,336. Step 1: s = max(min(1024/700, 1), 512/27) = 18.962963;
    # 27s = 512.0 -> 512; 700s = 13274.07 -> 13274 / 16 = 829.6 -> 830 -> 13280. 512 * 13280 = 6,799,360 px
    # > budget: ratio 1,806,336 / 6,799,360 = 0.265664; 512r = 136.02 -> 136 / 16 = 8.5 -> 8 (even) -> 128;
    # 13280r = 3528.0 -> 3528 / 16 = 220.5 -> 220 (even) -> 3520. Step 3: 3520 > 1024: s = 1024/3520 =
    # 0.290909; 128s = 37.24 -> 37 / 16 = 2.31 -> 2 -> 32; 3520s = 1024. Half-up: 144 x 3536 -> 48 x 1024.
    ((27, 700), DEFAULT_VAE_ARGS, 1, (32, 1024), (48, 1024)),
    # 1000x520, VAE: s = max(min(1024/1000, 1), 512/520) = 1: 1000 / 16 = 62.5 -> 62 (even) -> 992;
    # 520 / 16 = 32.5 -> 32 (even) -> 512; 507,904 px, long side 992: no further step.
    ((1000, 520), DEFAULT_VAE_ARGS, 1, (992, 512), (1008, 528)),
    # 567x567, ViT 980/378/14: s = 1; 567 / 14 = 40.5 -> 40 (even) -> 560; 313,600 px fits.
    ((567, 567), DEFAULT_VIT_ARGS, 1, (560, 560), (574, 574)),
    # 300x200, ViT: s = max(1, 378/200) = 1.89; 300s = 567.0 -> 40.5 -> 40 -> 560; 200s = 378 -> 27 -> 378.
    ((300, 200), DEFAULT_VIT_ARGS, 1, (560, 378), (574, 378)),
    # 1024x337, max 512 / min 16 / stride 16: s = 512/1024 = 0.5; 1024s = 512; 337s = 168.5 -> round() gives
    # 168 (even) -> 168 / 16 = 10.5 -> 10 (even) -> 160. Half-up: 169 (or 168) -> 11 -> 176.
    ((1024, 337), ImageTransformArgs(max_image_size=512, min_image_size=16, image_stride=16), 1, (512, 160),
     (512, 176)),
])
def test_bankers_rounding_decides_the_size(size, args, img_num, expected, half_up):
    got = resize_target(*size, args, img_num)
    assert got == expected
    assert got != half_up


def test_token_counts_of_sizes_that_are_not_multiples():
    # floor division per side: 1000 // 16 = 62, 520 // 16 = 32; 700 // 14 = 50, 30 // 14 = 2
    assert vae_tokens(1000, 520) == 1984
    assert vit_tokens(700, 30) == 100
    assert vit_tokens(27, 27, patch=16) == 1
    # the defaults, as numbers: 16 (8x VAE, then 2x2 patches) and 14 (SigLIP patch)
    assert vae_tokens(31, 31) == 1 and vae_tokens(32, 32) == 4 and vit_tokens(27, 28) == 2


def test_quirk_shrinks_more_than_a_square_root_would():
    budget = DEFAULT_VIT_ARGS.max_pixels / 3
    w, h = resize_target(980, 980, DEFAULT_VIT_ARGS, 3)
    assert w * h < budget * 0.75          # area ratio per side: ~0.49 of the budget, not ~1.0
    sqrt_side = round(980 * math.sqrt(budget / 980 ** 2) / 14) * 14
    assert w < sqrt_side


def test_img_num_only_for_vlm_sft():
    assert vit_img_num(resolve_task_kind("vlm_sft"), 3) == 3
    assert vit_img_num(resolve_task_kind("SftJSONLIterableDataset"), 2) == 2
    for name in ("sft", "sft_recon_v1", "sft_recon_v2", "t2i", "edit", "counterfactual", "text_only"):
        assert vit_img_num(resolve_task_kind(name), 3) == 1


def test_token_counts():
    assert vae_tokens(1024, 512) == 64 * 32
    assert vit_tokens(980, 980) == 70 * 70
    assert vit_tokens(686, 686) == 49 * 49


def test_transform_args_from_mapping():
    args = ImageTransformArgs.from_mapping({"max_image_size": 512}, DEFAULT_VAE_ARGS)
    assert args == ImageTransformArgs(512, 512, 16, DEFAULT_VAE_ARGS.max_pixels)
    with pytest.raises(ValueError, match="unknown transform arg"):
        ImageTransformArgs.from_mapping({"max_size": 512}, DEFAULT_VAE_ARGS)
    with pytest.raises(ValueError, match="larger than"):
        ImageTransformArgs.from_mapping({"min_image_size": 2048}, DEFAULT_VAE_ARGS)
    with pytest.raises(ValueError, match="positive integer"):
        ImageTransformArgs.from_mapping({"image_stride": 0}, DEFAULT_VAE_ARGS)


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 8000), h=st.integers(1, 8000), img_num=st.integers(1, 6),
       which=st.sampled_from([DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS]))
def test_resize_invariants(w, h, img_num, which):
    new_w, new_h = resize_target(w, h, which, img_num)
    assert new_w % which.image_stride == 0 and new_h % which.image_stride == 0
    assert new_w >= which.image_stride and new_h >= which.image_stride
    assert max(new_w, new_h) <= which.max_image_size + which.image_stride  # step 3 snaps to the nearest stride


def test_img_num_defaults_to_one_and_splits_the_budget():
    # 1024x1024 VAE: 1,048,576 px fits the 1,806,336 budget of one image; with img_num=2 the budget is 903,168:
    # ratio 0.861328125 -> 1024 * r = 882.0 -> 882 / 16 = 55.1 -> 55 -> 880
    assert resize_target(1024, 1024, DEFAULT_VAE_ARGS) == (1024, 1024)
    assert resize_target(1024, 1024, DEFAULT_VAE_ARGS, 2) == (880, 880)
    assert DEFAULT_VAE_ARGS.target_size(1024, 1024) == (1024, 1024)
    assert DEFAULT_VAE_ARGS.target_size(1024, 1024, 2) == (880, 880)
    assert DEFAULT_VAE_ARGS.target_size(27, 700) == (32, 1024)
    assert DEFAULT_VAE_ARGS.target_size(700, 27) == (1024, 32)


@pytest.mark.parametrize("w, h", [(0, 10), (10, 0), (-3, 5), (5, -3), (0, 0)])
def test_non_positive_sizes_are_refused(w, h):
    with pytest.raises(ValueError, match=rf"^image size must be positive, got {w}x{h}$"):
        resize_target(w, h, DEFAULT_VAE_ARGS)


@pytest.mark.parametrize("field, value", [("image_stride", 16.0), ("image_stride", True), ("max_pixels", 0),
                                          ("min_image_size", -1), ("max_image_size", "1024")])
def test_transform_args_must_be_positive_integers(field, value):
    args = {"max_image_size": 1024, "min_image_size": 512, "image_stride": 16, field: value}
    with pytest.raises(ValueError, match=rf"^{field} must be a positive integer, got {value!r}$"):
        ImageTransformArgs(**args)


def test_transform_args_limits_and_plain_values():
    tiny = ImageTransformArgs(max_image_size=1, min_image_size=1, image_stride=1, max_pixels=1)   # 1 is positive
    assert resize_target(5, 3, tiny) == (1, 1)
    assert DEFAULT_VIT_ARGS.to_dict() == {"max_image_size": 980, "min_image_size": 378, "image_stride": 14,
                                          "max_pixels": 2_007_040}
    assert DEFAULT_VAE_ARGS.max_pixels == 1_806_336                              # upstream's 14 * 14 * 9 * 1024
    assert ImageTransformArgs.from_mapping(None, DEFAULT_VIT_ARGS) is DEFAULT_VIT_ARGS
    with pytest.raises(ValueError, match=r"^transform args must be a mapping, got list$"):
        ImageTransformArgs.from_mapping([1024], DEFAULT_VAE_ARGS)
