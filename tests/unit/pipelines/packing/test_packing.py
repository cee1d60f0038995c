"""build_packed_batch on hand-built shard rows with real PNG bytes (docs/upstream-compat.md#pack-sequence, #packedbatch-fields, #attention-masks)."""
from __future__ import annotations

import io
import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_catalog.plan import ImageSlot, ImageTokens, SamplePlan, packed_length
from datasets_catalog.tokenizer import TextTokenizer
from pipelines.imaging.decode import image_to_tensor, load_image_rgb
from pipelines.packing.masks import allowed_pairs
from pipelines.packing.packed_batch import PackedBatch
from pipelines.packing.packer import (
    PackingError, build_packed_batch, build_packed_batch_from_plans, len2weight, patchify, sample_plan,
)
from pipelines.packing.config import PackingConfig
from pipelines.packing.position_ids import get_flattened_position_ids_extrapolate, get_flattened_position_ids_interpolate
from pipelines.packing.sample import StreamSample

TOK = TextTokenizer.builtin()
SP = TOK.special
CONFIG = PackingConfig(expected_num_tokens=3000, max_num_tokens=4096, max_num_tokens_per_sample=4096,
                       prefer_buffer_before=2048, max_latent_size=64)


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def image(width=40, height=30, vae=(32, 48), vit=(28, 42), seed=0, data=True, path="img.png"):
    return {
        "path": path, "width": width, "height": height, "format": "PNG",
        "vae_width": vae[0], "vae_height": vae[1], "vae_tokens": (vae[0] // 16) * (vae[1] // 16),
        "vit_width": vit[0], "vit_height": vit[1], "vit_tokens": (vit[0] // 14) * (vit[1] // 14),
        "sha256": "", "bytes": png(width, height, seed) if data else None, "meta": None,
    }


def sample(task, messages, inputs=(), outputs=(), draw_key=0, group="g", dataset="d", data_dir=None):
    row = {
        "sample_id": f"{dataset}:{draw_key}", "dataset": dataset, "task": task, "line_number": draw_key + 1,
        "messages": [{"from": r, "value": v} for r, v in messages],
        "input_images": list(inputs), "output_images": list(outputs), "extra": None,
    }
    s = StreamSample(f"{dataset}:{draw_key}", dataset, group, task, 0, row, data_dir, draw_key)
    s.num_tokens = stored_length(s)
    return s


def stored_length(s: StreamSample) -> int:
    """What ingest stores: datasets_catalog.plan.packed_length over the stored image sizes."""
    plan = sample_plan(s)
    texts = [len(TOK.encode(i.text)) for i in plan.items if i.type == "text"]
    images = {}
    for role in ("input", "output"):
        for k, rec in enumerate(s.row[f"{role}_images"]):
            images[ImageSlot(role, k)] = ImageTokens(rec["vae_tokens"], rec["vit_tokens"])
    return packed_length(plan, texts, images)


def edit_sample(draw_key=0, **kw):
    return sample("edit", [("human", "Make it red"), ("gpt", "Done")], [image(seed=1)], [image(seed=2)],
                  draw_key=draw_key, **kw)


def test_edit_sample_layout_rope_and_targets():
    s = edit_sample()
    b = build_packed_batch([s], CONFIG, TOK, seed=0)
    human, gpt = TOK.encode("Make it red"), TOK.encode("Done")
    vae_n, vit_n = 2 * 3, 2 * 3
    assert b.split_lens == [vae_n + 2, vit_n + 2, len(human) + 2, len(gpt) + 2, vae_n + 2]
    assert b.attn_modes == ["full", "full", "causal", "causal", "noise"]
    assert b.sequence_length == sum(b.split_lens) == b.sample_lens[0] == s.num_tokens
    # rope: an image is one position; clean images advance by 1; text by its length; noised target does not
    pos = b.packed_position_ids.tolist()
    starts = np.cumsum([0] + b.split_lens).tolist()
    assert pos[starts[0]:starts[1]] == [0] * (vae_n + 2)
    assert pos[starts[1]:starts[2]] == [1] * (vit_n + 2)
    assert pos[starts[2]:starts[3]] == list(range(2, 2 + len(human) + 2))
    r = 2 + len(human) + 2
    assert pos[starts[3]:starts[4]] == list(range(r, r + len(gpt) + 2))
    r += len(gpt) + 2
    assert pos[starts[4]:starts[5]] == [r] * (vae_n + 2)
    # text ids: markers around images, bos/eos around texts, at their sequence positions
    expected_ids = [SP.start_of_image, SP.end_of_image, SP.start_of_image, SP.end_of_image,
                    SP.bos, *human, SP.eos, SP.bos, *gpt, SP.eos, SP.start_of_image, SP.end_of_image]
    assert b.packed_text_ids.tolist() == expected_ids
    marker_positions = [starts[0], starts[1] - 1, starts[1], starts[2] - 1]
    assert b.packed_text_indexes.tolist()[:4] == marker_positions
    # every position is exactly one of text / vit / vae
    every = torch.cat([b.packed_text_indexes, b.packed_vit_token_indexes, b.packed_vae_token_indexes]).sort().values
    assert torch.equal(every, torch.arange(b.sequence_length))
    # CE: labels = gpt ids + eos, predicted from bos .. last id, weight 1/sqrt(n + 1)
    assert b.packed_label_ids.tolist() == [*gpt, SP.eos]
    assert b.ce_loss_indexes.tolist() == list(range(starts[3], starts[3] + len(gpt) + 1))
    assert torch.allclose(b.ce_loss_weights, torch.full((len(gpt) + 1,), 1 / math.sqrt(len(gpt) + 1)))
    # VAE: clean input has timestep -inf, the target one finite N(0,1) draw; mse on the target tokens only
    assert b.padded_images.shape == (2, 3, 48, 32)
    assert b.patchified_vae_latent_shapes == [(3, 2), (3, 2)]
    ts = b.packed_timesteps
    assert torch.isinf(ts[:vae_n]).all() and (ts[:vae_n] < 0).all()
    assert torch.isfinite(ts[vae_n:]).all() and ts[vae_n:].unique().numel() == 1
    assert b.mse_loss_indexes.tolist() == list(range(starts[4] + 1, starts[4] + 1 + vae_n))
    assert b.packed_vae_token_indexes.tolist()[vae_n:] == b.mse_loss_indexes.tolist()
    assert b.packed_latent_position_ids.tolist() == [0, 1, 64, 65, 128, 129] * 2
    # ViT: one image of 3 x 2 patches
    assert b.vit_token_seqlens.tolist() == [vit_n] and b.packed_vit_tokens.shape == (vit_n, 14 * 14 * 3)
    assert b.packed_vit_position_ids.tolist() == [0, 1, 70, 71, 140, 141]
    assert b.packed_vit_token_indexes.tolist() == list(range(starts[1] + 1, starts[2] - 1))


def test_noise_target_invisible_to_later_text_and_samples_isolated():
    cf = sample("counterfactual", [("human", "<image> What if?"), ("gpt", "Bigger.")], [image(seed=3)],
                [image(seed=4)], draw_key=5)
    b = build_packed_batch([cf, edit_sample(draw_key=6)], CONFIG, TOK, seed=1)
    assert len(b.nested_attention_masks) == 2
    first = b.nested_attention_masks[0] == 0
    n0 = b.sample_lens[0]
    splits0 = b.split_lens[:5]
    assert b.attn_modes[:5] == ["full", "full", "causal", "noise", "causal"]
    noise = slice(sum(splits0[:3]), sum(splits0[:4]))
    explanation = slice(sum(splits0[:4]), n0)
    assert not first[explanation, noise].any()           # the explanation cannot see the noised image
    assert first[explanation, :noise.start].all()        # but sees the input image and the instruction
    assert first[noise, noise].all() and first[noise, :noise.start].all()
    # the gpt text right after a noised target continues at the target's rope position (no advance)
    pos = b.packed_position_ids[:n0]
    assert pos[explanation.start] == pos[noise.start]
    # nested masks = the flex rule, block by block (no attention across samples)
    dense = torch.block_diag(*[m == 0 for m in b.nested_attention_masks])
    assert torch.equal(dense, allowed_pairs(b.sample_lens, b.split_lens, b.attn_modes))


def test_flex_form_pads_to_max_num_tokens_with_a_causal_pad_split():
    samples = [edit_sample(draw_key=1), edit_sample(draw_key=2)]
    dense = build_packed_batch(samples, CONFIG, TOK, seed=3)
    flex = build_packed_batch(samples, replace(CONFIG, use_flex=True), TOK, seed=3)
    L = dense.sequence_length
    assert flex.sequence_length == L and flex.nested_attention_masks is None
    assert sum(flex.split_lens) == sum(flex.sample_lens) == CONFIG.max_num_tokens
    assert flex.split_lens[-1] == flex.sample_lens[-1] == CONFIG.max_num_tokens - L
    assert flex.attn_modes[-1] == "causal"
    assert flex.split_lens[:-1] == dense.split_lens and flex.sample_lens[:-1] == dense.sample_lens
    assert flex.packed_position_ids.numel() == L
    allowed = allowed_pairs(flex.sample_lens, flex.split_lens, flex.attn_modes)[:L, :L]
    assert torch.equal(allowed, torch.block_diag(*[m == 0 for m in dense.nested_attention_masks]))
    assert torch.equal(flex.packed_timesteps, dense.packed_timesteps)


def test_flex_pack_longer_than_max_num_tokens_is_refused():
    s = edit_sample()
    small = PackingConfig(expected_num_tokens=10, max_num_tokens=20, max_num_tokens_per_sample=20,
                          prefer_buffer_before=10, max_latent_size=64, use_flex=True)
    with pytest.raises(PackingError, match="max_num_tokens"):
        build_packed_batch([s], small, TOK, seed=0)


def _tensors(b: PackedBatch) -> dict:
    out = {}
    for f in fields(b):
        v = getattr(b, f.name)
        if f.name in ("metrics", "stream_state"):
            continue
        out[f.name] = [x.clone() for x in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
    return out


def _assert_same(a: PackedBatch, b: PackedBatch) -> None:
    ta, tb = _tensors(a), _tensors(b)
    for name, va in ta.items():
        vb = tb[name]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), name
        elif isinstance(va, list) and va and isinstance(va[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(va, vb)), name
        else:
            assert va == vb, name


def test_deterministic_from_seed_and_draw_key_only():
    cfg = replace(CONFIG, text_cond_dropout_prob=0.5, vit_cond_dropout_prob=0.5)
    t2i = [sample("t2i", [("human", f"caption {k}")], [], [image(seed=k)], draw_key=k) for k in range(6)]
    sft = [sample("sft", [("human", "<image> what?"), ("gpt", "this")], [image(seed=k)], draw_key=100 + k)
           for k in range(6)]
    a = build_packed_batch(t2i + sft, cfg, TOK, seed=7)
    _assert_same(a, build_packed_batch(t2i + sft, cfg, TOK, seed=7))
    # a sample's draws do not depend on its pack neighbours or its place in the pack
    alone = build_packed_batch([t2i[3]], cfg, TOK, seed=7)
    with_others = build_packed_batch([sft[0], t2i[3], sft[1]], cfg, TOK, seed=7)
    mine = with_others.packed_vae_token_indexes >= with_others.sample_lens[0]
    mine &= with_others.packed_vae_token_indexes < sum(with_others.sample_lens[:2])
    assert torch.equal(alone.packed_timesteps, with_others.packed_timesteps[mine])
    assert with_others.split_lens[len(build_packed_batch([sft[0]], cfg, TOK, seed=7).split_lens):][:len(alone.split_lens)] \
        == alone.split_lens
    # another seed gives other draws
    other = build_packed_batch(t2i + sft, cfg, TOK, seed=8)
    assert not torch.equal(a.packed_timesteps, other.packed_timesteps)


def test_timesteps_are_standard_normal_per_noised_image():
    samples = [sample("t2i", [("human", "c")], [], [image(16, 16, vae=(16, 16), seed=k)], draw_key=k)
               for k in range(400)]
    b = build_packed_batch(samples, replace(CONFIG, text_cond_dropout_prob=0.0, build_nested_masks=False), TOK, 0)
    t = b.packed_timesteps
    assert t.numel() == 400 and torch.isfinite(t).all()   # one latent token per image
    assert abs(t.mean().item()) < 0.2 and abs(t.std().item() - 1) < 0.15
    assert t.unique().numel() == 400


def _cfg_fraction(samples, cfg, kind, plans=None):
    cfg = replace(cfg, build_nested_masks=False)
    if plans is None:
        b = build_packed_batch(samples, cfg, TOK, seed=11)
    else:
        b = build_packed_batch_from_plans(samples, plans, cfg, TOK, seed=11)
    return b, b.metrics["cfg_dropped"][kind] / len(samples)


def test_cfg_dropout_probabilities_text_vit_vae():
    n = 1200
    tol = 4 * math.sqrt(0.25 / n)   # four standard errors
    t2i = [sample("t2i", [("human", "a caption")], [], [image(16, 16, vae=(16, 16), seed=k % 5)], draw_key=k)
           for k in range(n)]
    b, frac = _cfg_fraction(t2i, replace(CONFIG, text_cond_dropout_prob=0.3), "text")
    assert abs(frac - 0.3) < tol
    # a dropped text is skipped entirely: no tokens for it, and the image rope stays at 0
    text_splits = sum(1 for m in b.attn_modes if m == "causal")
    assert text_splits == n - b.metrics["cfg_dropped"]["text"]

    sft = [sample("sft", [("human", "<image> q"), ("gpt", "a")], [image(14, 14, vit=(14, 14), seed=k % 5)],
                  draw_key=k) for k in range(n)]
    b, frac = _cfg_fraction(sft, replace(CONFIG, vit_cond_dropout_prob=0.6), "vit")
    assert abs(frac - 0.6) < tol
    assert b.vit_token_seqlens.numel() == n - b.metrics["cfg_dropped"]["vit"]

    # no docs/upstream-compat.md#sequence-plans class has a vae element with enable_cfg=1 (BAGEL's edit classes do): hand-built plan
    plan = SamplePlan()
    plan.vae(ImageSlot("input", 0), loss=0, cfg=1)
    plan.text("go", loss=1, cfg=0)
    vae = [sample("t2i", [("human", "x")], [image(16, 16, vae=(16, 16), seed=k % 5)], draw_key=k) for k in range(n)]
    b, frac = _cfg_fraction(vae, replace(CONFIG, vae_cond_dropout_prob=0.2), "vae", plans=[plan] * n)
    assert abs(frac - 0.2) < tol
    assert b.padded_images.shape[0] == n - b.metrics["cfg_dropped"]["vae"]


def test_dropped_images_still_advance_rope():
    s = sample("sft", [("human", "<image> q"), ("gpt", "a")], [image(14, 14, vit=(14, 14))])
    b = build_packed_batch([s], replace(CONFIG, vit_cond_dropout_prob=1.0), TOK, seed=0)
    assert b.packed_vit_tokens is None and b.metrics["cfg_dropped"]["vit"] == 1
    assert b.packed_position_ids[0].item() == 1         # the text after the dropped image starts at 1
    plan = SamplePlan()
    plan.vae(ImageSlot("input", 0), loss=0, cfg=1)
    plan.text("go", loss=1, cfg=0)
    b = build_packed_batch_from_plans([s], [plan], replace(CONFIG, vae_cond_dropout_prob=1.0), TOK, seed=0)
    assert b.padded_images is None and b.packed_position_ids[0].item() == 1


def test_enable_cfg_zero_is_never_dropped():
    always = replace(CONFIG, text_cond_dropout_prob=1.0, vit_cond_dropout_prob=1.0, vae_cond_dropout_prob=1.0)
    samples = [
        edit_sample(draw_key=1),
        sample("counterfactual", [("human", "<image> if?"), ("gpt", "so")], [image()], [image()], draw_key=2),
        sample("sft_recon_v2", [("human", "<image> see"), ("gpt", "ok")], [image()], draw_key=3),
        sample("vlm_sft", [("human", "<image> see"), ("gpt", "ok")], [image()], draw_key=4),
        sample("text_only", [("human", "hi"), ("gpt", "hello")], draw_key=5),
    ]
    b = build_packed_batch(samples, always, TOK, seed=0)
    assert b.metrics["cfg_dropped"] == {"text": 0, "vit": 0, "vae": 0}
    assert b.sample_lens == [s.num_tokens for s in samples]


def test_vit_tokens_are_patchified_pixels_in_row_major_order():
    rec = image(42, 28, vit=(42, 28), seed=9)          # stored target = real size: no resampling
    s = sample("vlm_sft", [("human", "<image>"), ("gpt", "x")], [rec])
    b = build_packed_batch([s], CONFIG, TOK, seed=0)
    pixels = image_to_tensor(load_image_rgb(rec["bytes"], None), 42, 28)
    assert torch.equal(b.packed_vit_tokens, patchify(pixels, 14))
    # first token = top-left 14 x 14 patch, flattened (row-in-patch, col-in-patch, channel)
    assert torch.equal(b.packed_vit_tokens[0], pixels[:, :14, :14].permute(1, 2, 0).reshape(-1))
    assert torch.equal(b.packed_vit_tokens[1], pixels[:, :14, 14:28].permute(1, 2, 0).reshape(-1))
    assert b.packed_vit_position_ids.tolist() == get_flattened_position_ids_extrapolate(28, 42, 14, 70).tolist()
    interp = build_packed_batch([s], replace(CONFIG, interpolate_pos=True), TOK, seed=0)
    assert interp.packed_vit_position_ids.tolist() == get_flattened_position_ids_interpolate(28, 42, 14, 70).tolist()


def test_vae_images_are_padded_bottom_right_to_the_batch_max():
    outs = [image(40, 60, vae=(32, 48), seed=1), image(70, 20, vae=(64, 16), seed=2)]
    s = sample("t2i", [("human", "two")], [], outs)
    b = build_packed_batch([s], CONFIG, TOK, seed=0)
    assert b.padded_images.shape == (2, 3, 48, 64)
    assert b.patchified_vae_latent_shapes == [(3, 2), (1, 4)]
    first = image_to_tensor(load_image_rgb(outs[0]["bytes"], None), 32, 48)
    assert torch.equal(b.padded_images[0, :, :48, :32], first)
    assert (b.padded_images[0, :, :, 32:] == 0).all() and (b.padded_images[1, :, 16:, :] == 0).all()
    assert b.packed_latent_position_ids.tolist() == [0, 1, 64, 65, 128, 129, 0, 1, 2, 3]
    # two loss images in a row: one rope position, each its own noise split and own timestep
    assert b.attn_modes == ["causal", "noise", "noise"]
    vae_pos = b.packed_position_ids[b.packed_vae_token_indexes]
    assert vae_pos.unique().numel() == 1
    assert b.packed_timesteps[:6].unique().numel() == 1 and b.packed_timesteps[6] != b.packed_timesteps[0]


def test_referenced_images_are_read_from_data_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = png(40, 30, seed=5)
    (tmp_path / "imgs" / "a.png").write_bytes(data)
    rec = image(seed=5, data=False, path="/imgs/a.png")   # leading separator stripped, as upstream
    s = sample("sft", [("human", "<image> q"), ("gpt", "a")], [rec], data_dir=str(tmp_path))
    embedded = sample("sft", [("human", "<image> q"), ("gpt", "a")], [image(seed=5)])
    keep = replace(CONFIG, vit_cond_dropout_prob=0.0)
    from_file = build_packed_batch([s], keep, TOK, 0).packed_vit_tokens
    assert from_file is not None and torch.equal(from_file, build_packed_batch([embedded], keep, TOK, 0).packed_vit_tokens)
    orphan = sample("sft", [("human", "<image> q"), ("gpt", "a")], [rec])
    with pytest.raises(PackingError, match="data_dir"):
        build_packed_batch([orphan], keep, TOK, 0)


def test_grids_beyond_the_position_tables_are_refused():
    with pytest.raises(PackingError, match="max_latent_size"):
        build_packed_batch([edit_sample()], replace(CONFIG, max_latent_size=2), TOK, 0)
    # interpolation maps any grid into the table
    b = build_packed_batch([edit_sample()], replace(CONFIG, max_latent_size=2, interpolate_pos=True), TOK, 0)
    assert b.packed_latent_position_ids.max() < 4


def test_metrics_and_batch_data_indexes():
    a = edit_sample(draw_key=1, group="edit", dataset="stain")
    t = sample("text_only", [("human", "hi"), ("gpt", "hello there")], draw_key=2, group="text", dataset="chat")
    b = build_packed_batch([a, t], CONFIG, TOK, seed=0)
    m = b.metrics
    assert m["num_tokens"] == b.sequence_length == sum(b.sample_lens)
    assert m["packing_efficiency"] == b.sequence_length / CONFIG.max_num_tokens
    assert m["tokens_per_group"] == {"edit": b.sample_lens[0], "text": b.sample_lens[1]}
    assert m["samples_per_group"] == {"edit": 1, "text": 1}
    assert m["ce_tokens"] == b.num_ce_tokens == len(TOK.encode("Done")) + 1 + len(TOK.encode("hello there")) + 1
    assert m["mse_tokens"] == b.num_mse_tokens == 6
    assert m["planned_tokens"] == a.num_tokens + t.num_tokens == b.sequence_length
    assert [(d["sample_id"], d["dataset"], d["group"]) for d in b.batch_data_indexes] == \
        [(a.sample_id, "stain", "edit"), (t.sample_id, "chat", "text")]
    # the text-only sample's positions restart at 0 (rope per sample)
    assert b.packed_position_ids[b.sample_lens[0]].item() == 0
    assert b.ce_loss_weights[-1].item() == pytest.approx(len2weight(len(TOK.encode("hello there")) + 1))


def test_text_only_pack_has_no_image_fields_and_empty_pack_is_refused():
    b = build_packed_batch([sample("text_only", [("human", "a"), ("gpt", "b")])], CONFIG, TOK, 0)
    assert b.padded_images is None and b.packed_vit_tokens is None and b.packed_timesteps is None
    assert not b.has_vae and not b.has_vit
    with pytest.raises(PackingError):
        build_packed_batch([], CONFIG, TOK, 0)


def test_rows_read_back_from_real_parquet_pack_identically(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.storage.shard_schema import SHARD_SCHEMA

    samples = [edit_sample(draw_key=1),
               sample("sft_recon_v1", [("human", "<image> see"), ("gpt", "ok")], [image(seed=3)], draw_key=2)]
    rows = [{**s.row, "text_tokens": 0, "num_tokens": s.num_tokens} for s in samples]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp_path / "part-0.parquet")
    table = pq.read_table(tmp_path / "part-0.parquet")
    for read_rows in (table.to_pylist(), table.to_pandas().to_dict("records")):   # lists, or numpy arrays
        again = [replace(s, row=r) for s, r in zip(samples, read_rows)]
        _assert_same(build_packed_batch(samples, CONFIG, TOK, 5), build_packed_batch(again, CONFIG, TOK, 5))


def test_an_undecodable_image_skips_that_sample_visibly(tmp_path):
    broken = image(seed=1)
    broken["bytes"] = b"\x89PNG\r\n\x1a\n truncated"
    # the target image is decoded last: four items of the sample are already packed when it fails
    bad = sample("edit", [("human", "x"), ("gpt", "y")], [image(seed=2)], [broken], draw_key=2)
    good = [edit_sample(draw_key=1), edit_sample(draw_key=3)]
    b = build_packed_batch([good[0], bad, good[1]], CONFIG, TOK, seed=4)
    assert [d["sample_id"] for d in b.batch_data_indexes] == [good[0].sample_id, good[1].sample_id]
    assert [s["sample_id"] for s in b.metrics["skipped_samples"]] == [bad.sample_id]
    assert b.metrics["num_samples"] == 2
    _assert_same(b, build_packed_batch(good, CONFIG, TOK, seed=4))   # nothing of the bad sample is left
    with pytest.raises(PackingError, match=bad.sample_id):
        build_packed_batch([good[0], bad], CONFIG, TOK, seed=4, on_image_error="raise")
    with pytest.raises(PackingError, match="no sample"):
        build_packed_batch([bad], CONFIG, TOK, seed=4)


def test_jpeg_draft_is_off_by_default_and_when_on_keeps_shapes_and_stays_close():
    """PackingConfig.jpeg_draft: large JPEGs decoded at reduced DCT scale (approximate pixels, same layout)."""
    yy, xx = np.mgrid[0:256, 0:320].astype(np.float32)
    arr = np.stack([128 + 90 * np.sin(xx / 40), 128 + 90 * np.cos(yy / 30), xx / 2], -1).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=92)
    rec = {**image(320, 256, vae=(64, 48), vit=(56, 42)), "bytes": buf.getvalue(), "format": "JPEG"}
    s = sample("edit", [("human", "Make it red"), ("gpt", "Done")], [rec], [dict(rec)])
    assert not CONFIG.jpeg_draft
    exact = build_packed_batch([s], CONFIG, TOK, seed=0)
    want = image_to_tensor(load_image_rgb(rec["bytes"], None), 64, 48)
    assert torch.equal(exact.padded_images[0], want)                       # default: upstream-exact pixels
    drafted = build_packed_batch([s], replace(CONFIG, jpeg_draft=True), TOK, seed=0)
    assert drafted.split_lens == exact.split_lens and drafted.padded_images.shape == exact.padded_images.shape
    assert not torch.equal(drafted.padded_images, exact.padded_images)
    assert (drafted.padded_images - exact.padded_images).abs().mean() * 127.5 < 2.0
    assert (drafted.packed_vit_tokens - exact.packed_vit_tokens).abs().mean() * 127.5 < 2.0
