"""Invariants of build_packed_batch over random packs (hypothesis): every position is used once, CE labels
are the next tokens, flex and dense forms agree, lengths equal the ingest count when nothing is dropped."""
from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pipelines.packing.masks import allowed_pairs
from pipelines.packing.packer import build_packed_batch
from tests.unit.pipelines.packing.test_packing import CONFIG, TOK, image, sample

IMAGES = [image(16, 16, vae=(16, 32), vit=(14, 28), seed=k) for k in range(3)]
texts = st.text(alphabet="ab <>\n", min_size=0, max_size=12)


@st.composite
def samples(draw, key):
    kind = draw(st.sampled_from(["sft", "vlm_sft", "text_only", "sft_recon_v1", "sft_recon_v2", "t2i", "edit",
                                 "counterfactual"]))
    n_turns = draw(st.integers(1, 3))
    messages = []
    for _ in range(n_turns):
        messages.append(("human", draw(texts) + draw(st.sampled_from(["", "<image>", "<image> x <image>"]))))
        messages.append(("gpt", draw(texts) + "ok"))
    n_in = 0 if kind in ("text_only", "t2i") else draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2)) if kind in ("t2i", "edit", "counterfactual") else 0
    return sample(kind, messages, IMAGES[:n_in], IMAGES[1:1 + n_out], draw_key=key)


@st.composite
def packs(draw):
    return [draw(samples(key)) for key in range(draw(st.integers(1, 4)))]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packs(), st.integers(0, 2**32))
def test_pack_invariants(pack, seed):
    cfg = replace(CONFIG, text_cond_dropout_prob=0.5, vit_cond_dropout_prob=0.5)
    b = build_packed_batch(pack, cfg, TOK, seed)
    L = b.sequence_length
    assert sum(b.split_lens) == sum(b.sample_lens) == L == b.packed_position_ids.numel()
    parts = [b.packed_text_indexes]
    if b.packed_vit_token_indexes is not None:
        parts.append(b.packed_vit_token_indexes)
        assert b.vit_token_seqlens.sum() == b.packed_vit_tokens.shape[0] == b.packed_vit_token_indexes.numel()
    if b.packed_vae_token_indexes is not None:
        parts.append(b.packed_vae_token_indexes)
        assert sum(h * w for h, w in b.patchified_vae_latent_shapes) == b.packed_vae_token_indexes.numel()
        noised = torch.isfinite(b.packed_timesteps)
        assert torch.equal(b.packed_vae_token_indexes[noised], b.mse_loss_indexes)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(L))   # each position exactly once
    if b.ce_loss_indexes is not None:   # labels are the next text tokens of the same text
        token_at = torch.full((L + 1,), -1, dtype=torch.long)
        token_at[b.packed_text_indexes] = b.packed_text_ids
        assert torch.equal(token_at[b.ce_loss_indexes + 1], b.packed_label_ids)
    dense = torch.block_diag(*[m == 0 for m in b.nested_attention_masks])
    assert torch.equal(dense, allowed_pairs(b.sample_lens, b.split_lens, b.attn_modes))
    flex = build_packed_batch(pack, replace(cfg, use_flex=True), TOK, seed)
    assert flex.split_lens[:-1] == b.split_lens and torch.equal(flex.packed_position_ids, b.packed_position_ids)
    # rope never goes back inside a sample
    for pos in torch.split(b.packed_position_ids, b.sample_lens):
        assert (pos[1:] >= pos[:-1]).all()
    if sum(b.metrics["cfg_dropped"].values()) == 0:
        assert b.sample_lens == [s.num_tokens for s in pack]
        starts = torch.tensor([0] + b.sample_lens[:-1]).cumsum(0)
        assert (b.packed_position_ids[starts] == 0).all()   # positions restart at 0 in every sample
