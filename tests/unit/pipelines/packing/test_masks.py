"""Attention masks (docs/upstream-compat.md#attention-masks): dense per-sample masks and the flex rule, on hand-built splits."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipelines.packing.masks import allowed_pairs, attention_allowed_per_sample, prepare_attention_mask_per_sample


def reference_allowed(split_lens, modes):
    """docs/upstream-compat.md#attention-masks written pair by pair, independently of the implementation."""
    owner = [i for i, n in enumerate(split_lens) for _ in range(n)]
    size = len(owner)
    out = torch.zeros((size, size), dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            same = owner[q] == owner[k]
            if modes[owner[k]] == "noise" and not same:
                continue  # nobody else sees a noise split, earlier or later
            if k < q and not same:
                out[q, k] = True  # everything earlier in the sample
            elif same:
                out[q, k] = k <= q if modes[owner[q]] == "causal" else True
    return out


def test_hand_built_sample_matches_rules():
    splits, modes = [3, 2, 2, 3], ["causal", "full", "noise", "causal"]
    mask = prepare_attention_mask_per_sample(splits, modes)
    assert mask.shape == (10, 10) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, -math.inf}
    allowed = mask == 0
    # causal text: lower triangle only
    assert allowed[0, 0] and not allowed[0, 1] and allowed[2, 0] and allowed[2, 1]
    # full image (rows 3-4): sees itself completely and all earlier text
    assert allowed[3, 4] and allowed[4, 3] and allowed[3, 0:3].all()
    # noise split (rows 5-6): sees itself fully and everything before it
    assert allowed[5, 6] and allowed[5, 0:5].all()
    # noise columns are blanked for every other row, including the later text
    assert not allowed[7:, 5:7].any() and not allowed[:5, 5:7].any()
    # later text still sees earlier non-noise tokens causally
    assert allowed[9, 0:5].all() and allowed[9, 7:10].all() and not allowed[7, 8]
    assert torch.equal(allowed, reference_allowed(splits, modes))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["causal", "full", "noise"])), min_size=1, max_size=7))
def test_dense_mask_matches_reference(parts):
    splits = [n for n, _ in parts]
    modes = [m for _, m in parts]
    assert torch.equal(attention_allowed_per_sample(splits, modes), reference_allowed(splits, modes))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 4), st.sampled_from(["causal", "full", "noise"])),
                         min_size=1, max_size=4), min_size=1, max_size=3))
def test_flex_rule_equals_block_diagonal_of_dense_masks(samples):
    split_lens = [n for sample in samples for n, _ in sample]
    modes = [m for sample in samples for _, m in sample]
    sample_lens = [sum(n for n, _ in sample) for sample in samples]
    flex = allowed_pairs(sample_lens, split_lens, modes)
    dense = torch.block_diag(*[attention_allowed_per_sample([n for n, _ in s], [m for _, m in s]) for s in samples])
    assert torch.equal(flex, dense)


def test_no_attention_across_samples():
    flex = allowed_pairs([3, 2], [3, 2], ["full", "full"])
    assert not flex[3:, :3].any() and not flex[:3, 3:].any()
    assert flex[:3, :3].all() and flex[3:, 3:].all()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown attention mode"):
        prepare_attention_mask_per_sample([2], ["bidirectional"])
    with pytest.raises(ValueError, match="split_lens"):
        prepare_attention_mask_per_sample([2, 1], ["full"])
    with pytest.raises(ValueError, match="sum"):
        allowed_pairs([4], [2], ["full"])


def test_refusals_name_the_value():
    with pytest.raises(ValueError, match=r"^split length must be >= 0, got -1$"):
        prepare_attention_mask_per_sample([2, -1], ["full", "causal"])
    with pytest.raises(ValueError, match=r"^2 split_lens but 1 attn_modes$"):
        prepare_attention_mask_per_sample([2, 1], ["full"])
    with pytest.raises(ValueError, match=r"^split_lens sum to 2 but sample_lens sum to 4$"):
        allowed_pairs([4], [2], ["full"])


def test_dense_mask_is_float32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mask = prepare_attention_mask_per_sample([2, 1], ["full", "causal"])
    finally:
        torch.set_default_dtype(previous)
    assert mask.dtype == torch.float32
    assert (mask == 0).tolist() == [[True, True, False], [True, True, False], [True, True, True]]
