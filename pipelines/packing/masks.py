"""Attention masks of packed sequences (docs/upstream-compat.md#attention-masks).

`prepare_attention_mask_per_sample` is the dense (SDPA) form, one [S, S] float mask per sample with
0 = attend and -inf = blocked. `allowed_pairs` is the flex rule written out densely over a whole pack;
the model's flex/varlen path must agree with it, and tests use it to check both forms against each other.
"""
from __future__ import annotations

from typing import Sequence

import torch

ATTN_MODES = ("causal", "full", "noise")
NEG_INF = float("-inf")


def _check(split_lens: Sequence[int], attn_modes: Sequence[str]) -> None:
    if len(split_lens) != len(attn_modes):
        raise ValueError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes")
    for mode in attn_modes:
        if mode not in ATTN_MODES:
            raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTN_MODES}")
    for length in split_lens:
        if length < 0:
            raise ValueError(f"split length must be >= 0, got {length}")


def _allowed(split_lens: list[int], attn_modes: list[str], sample_lens: list[int]) -> torch.Tensor:
    total = int(sum(split_lens))
    lens = torch.tensor(split_lens, dtype=torch.long)
    split_id = torch.repeat_interleave(torch.arange(len(split_lens)), lens)
    is_noise = torch.tensor([m == "noise" for m in attn_modes], dtype=torch.bool)[split_id]
    is_bidir = torch.tensor([m != "causal" for m in attn_modes], dtype=torch.bool)[split_id]
    pos = torch.arange(total)
    same_split = split_id[:, None] == split_id[None, :]
    allowed = pos[:, None] >= pos[None, :]
    allowed |= same_split & is_bidir[None, :]
    allowed &= ~(is_noise[None, :] & ~same_split)
    sample_id = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens, dtype=torch.long))
    allowed &= sample_id[:, None] == sample_id[None, :]
    return allowed


def prepare_attention_mask_per_sample(split_lens: Sequence[int], attn_modes: Sequence[str],
                                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Float [S, S] mask of one sample: 0 where attention is allowed, -inf where it is blocked.

    Upstream's two passes, written straight into the float mask (no [S, S] bool intermediate), row block
    by row block so that each element is written about once (no initial fill of the whole matrix):
    1. causal or full inside each split, plus every earlier column of the sample;
    2. a noise split's columns are blanked for every other row, later ones included; its own block stays open.
    """
    _check(split_lens, attn_modes)
    size = int(sum(split_lens))
    mask = torch.empty((size, size), dtype=torch.float32, device=device)
    start = 0
    for length, mode in zip(split_lens, attn_modes):
        end = start + length
        rows = mask[start:end]
        rows[:, :start] = 0
        rows[:, end:] = NEG_INF
        if mode == "causal":
            rows[:, start:end].fill_(NEG_INF).triu_(1)
        else:
            rows[:, start:end] = 0
        start = end
    start = 0
    for length, mode in zip(split_lens, attn_modes):
        end = start + length
        if mode == "noise":
            mask[:, start:end] = NEG_INF
            mask[start:end, start:end] = 0
        start = end
    return mask


def attention_allowed_per_sample(split_lens: Sequence[int], attn_modes: Sequence[str]) -> torch.Tensor:
    """Boolean [S, S] form of `prepare_attention_mask_per_sample` (True = query row may attend to key column)."""
    return prepare_attention_mask_per_sample(split_lens, attn_modes) == 0


def allowed_pairs(sample_lens: Sequence[int], split_lens: Sequence[int],
                  attn_modes: Sequence[str]) -> torch.Tensor:
    """Dense boolean [L, L] form of the flex rule over a whole pack (small packs only: tests, debugging).

    allow(q, k) = [q >= k or (q, k in the same full/noise split)] and not [k in a noise split that q is
    not in] and [same sample]. `split_lens` must tile `sample_lens` (a flex pad split included).
    """
    _check(split_lens, attn_modes)
    total = int(sum(sample_lens))
    if int(sum(split_lens)) != total:
        raise ValueError(f"split_lens sum to {sum(split_lens)} but sample_lens sum to {total}")
    return _allowed(list(split_lens), list(attn_modes), list(sample_lens))
