"""Forward/backward of the tiny unified model on packed batches: llm2vae zero-init, packing invisibility
(real packer), noise-split isolation, MoT routing, gradients per freeze option, attention backends agree."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_catalog.tokenizer import TextTokenizer
from model.attention import PackedAttention
from model.config import ModelConfig
from model.freeze import apply_freeze
from model.unified import UnifiedModel
from pipelines.packing.packer import build_packed_batch
from pipelines.packing.config import PackingConfig
from pipelines.packing.sample import StreamSample
from tests.unit.model.test_model_batches import single_thread, Text, edit_sample, make_batch, vqa_sample  # noqa: F401

TOK = TextTokenizer.builtin()
PACK = PackingConfig(expected_num_tokens=2000, max_num_tokens=4096, max_num_tokens_per_sample=4096,
                     prefer_buffer_before=1024, max_latent_size=32)


def tiny_model(seed: int = 0, **overrides) -> UnifiedModel:
    torch.manual_seed(seed)
    return UnifiedModel(ModelConfig.tiny(vocab_size=TOK.vocab_size, **overrides))


# -- real shard rows through the real packer ----------------------------------------------------

def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def _image(vae=(32, 48), vit=(28, 42), seed=0) -> dict:
    return {"path": f"img{seed}.png", "width": 40, "height": 30, "format": "PNG",
            "vae_width": vae[0], "vae_height": vae[1], "vae_tokens": (vae[0] // 16) * (vae[1] // 16),
            "vit_width": vit[0], "vit_height": vit[1], "vit_tokens": (vit[0] // 14) * (vit[1] // 14),
            "sha256": "", "bytes": _png(40, 30, seed), "meta": None}


def stream_sample(task: str, messages, inputs=(), outputs=(), draw_key: int = 0) -> StreamSample:
    row = {"sample_id": f"d:{draw_key}", "dataset": "d", "task": task, "line_number": draw_key + 1,
           "messages": [{"from": r, "value": v} for r, v in messages], "input_images": list(inputs),
           "output_images": list(outputs), "extra": None}
    return StreamSample(f"d:{draw_key}", "d", "g", task, 100, row, None, draw_key)


def real_samples() -> list[StreamSample]:
    return [
        stream_sample("sft", [("human", "<image>What organ is shown?"), ("gpt", "The left lung.")],
                      [_image(seed=1)], draw_key=0),
        stream_sample("edit", [("human", "Remove the nodule."), ("gpt", "Nodule removed.")],
                      [_image(seed=2)], [_image(seed=3)], draw_key=1),
        stream_sample("counterfactual", [("human", "<image>What if the effusion were gone?"),
                                         ("gpt", "Clear costophrenic angles.")],
                      [_image(vae=(48, 32), vit=(42, 28), seed=4)], [_image(vae=(48, 32), vit=(42, 28), seed=5)],
                      draw_key=2),
        stream_sample("t2i", [("human", "A chest X-ray."), ("gpt", "")], [], [_image(seed=6)], draw_key=3),
    ]


def per_image_latent(model, batch, seed=0):
    """Encode each VAE image alone (posterior mean) so a latent never depends on the pack's padding."""
    lat = []
    with torch.no_grad():
        for i, (h, w) in enumerate(batch.patchified_vae_latent_shapes):
            img = batch.padded_images[i: i + 1, :, : h * 16, : w * 16]
            lat.append(model.vae_model.encode(img, sample=False)[0])
    H = max(l.shape[1] for l in lat)
    W = max(l.shape[2] for l in lat)
    out = torch.zeros(len(lat), lat[0].shape[0], H, W)
    for i, l in enumerate(lat):
        out[i, :, : l.shape[1], : l.shape[2]] = l
    return out


def noise_for(batch, channels, seed):
    n = 0 if batch.packed_vae_token_indexes is None else batch.packed_vae_token_indexes.numel()
    return torch.randn(n, channels, generator=torch.Generator().manual_seed(seed))


# -- tests ---------------------------------------------------------------------------------------

def test_forward_backward_shapes_and_llm2vae_zero_init():
    m = tiny_model()
    assert torch.count_nonzero(m.llm2vae.weight) == 0 and torch.count_nonzero(m.llm2vae.bias) == 0
    b = make_batch([vqa_sample(0), edit_sample(1)])
    out = m(b, m.vae_model.encode(b.padded_images, generator=torch.Generator().manual_seed(0)))
    assert out.ce.shape == (b.num_ce_tokens,)
    assert out.mse.shape == (b.num_mse_tokens, m.config.latent_channels)
    (out.ce.mean() + out.mse.mean()).backward()
    assert m.llm2vae.weight.grad.abs().sum() > 0


def test_packing_is_invisible_per_sample_losses_equal_alone_vs_packed():
    m = tiny_model(1)
    with torch.no_grad():
        m.llm2vae.weight.normal_(0, 0.05)  # make MSE depend on the hidden states
    samples = real_samples()
    packed = build_packed_batch(samples, PACK, TOK, seed=7)
    C = m.config.latent_channels
    alone = [build_packed_batch([s], PACK, TOK, seed=7) for s in samples]
    noises = [noise_for(b, C, seed=i) for i, b in enumerate(alone)]
    with torch.no_grad():
        out = m(packed, per_image_latent(m, packed), noise=torch.cat(noises))
        singles = [m(b, per_image_latent(m, b) if b.has_vae else None, noise=n if n.numel() else None)
                   for b, n in zip(alone, noises)]
    ce = torch.cat([s.ce for s in singles if s.ce is not None])
    mse = torch.cat([s.mse for s in singles if s.mse is not None])
    assert out.ce.shape == ce.shape and out.mse.shape == mse.shape and mse.shape[0] > 0
    torch.testing.assert_close(out.ce, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mse, mse, rtol=1e-5, atol=1e-5)


def _hidden(model, batch, latent, noise):
    captured = {}
    handle = model.language_model.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    try:
        model(batch, latent, noise=noise)
    finally:
        handle.remove()
    return captured["h"]


def _noise_splits(batch) -> list[set[int]]:
    out, pos = [], 0
    for length, mode in zip(batch.split_lens, batch.attn_modes):
        if mode == "noise":
            out.append(set(range(pos, pos + length)))
        pos += length
    return out


def test_noise_split_tokens_never_influence_other_tokens():
    m = tiny_model(2)
    batch = build_packed_batch(real_samples(), PACK, TOK, seed=3)
    lat = per_image_latent(m, batch)
    C = m.config.latent_channels
    noise = noise_for(batch, C, 0)
    vae_idx = batch.packed_vae_token_indexes
    noised = torch.isfinite(batch.packed_timesteps)
    splits = _noise_splits(batch)
    assert len(splits) == 3 and (~noised).any()  # edit, counterfactual (text follows its target), t2i
    with torch.no_grad():
        h0 = _hidden(m, batch, lat, noise)
        for k, split in enumerate(splits):
            # perturb the noise of this split's latents only (markers are in the split too)
            rows = torch.tensor([i for i, p in enumerate(vae_idx.tolist()) if p in split])
            noise2 = noise.clone()
            noise2[rows] += 3.0 * torch.randn(len(rows), C, generator=torch.Generator().manual_seed(k))
            h1 = _hidden(m, batch, lat, noise2)
            changed = set(((h0 - h1).abs().amax(dim=1) > 0).nonzero().flatten().tolist())
            assert changed <= split, sorted(changed - split)
            assert set(vae_idx[rows].tolist()) <= changed  # the perturbation does reach the split itself


def test_generation_twins_see_only_vae_tokens():
    m = tiny_model(3)
    batch = make_batch([vqa_sample(0), edit_sample(1)])
    n_vae = batch.packed_vae_token_indexes.numel()
    n_und = batch.sequence_length - n_vae
    rows: dict[str, list[int]] = {}
    hooks = []
    for name, mod in m.language_model.named_modules():
        leaf = name.split(".")[-1]
        if leaf.endswith("_moe_gen") or leaf in ("q_proj", "o_proj", "mlp", "input_layernorm", "norm"):
            hooks.append(mod.register_forward_pre_hook(
                lambda mod, args, name=name: rows.setdefault(name, []).append(args[0].shape[0])))
    out = m(batch, m.vae_model.encode(batch.padded_images))
    for h in hooks:
        h.remove()
    gen = {k: v for k, v in rows.items() if "_moe_gen" in k}
    und = {k: v for k, v in rows.items() if "_moe_gen" not in k}
    assert gen and und
    assert all(v == [n_vae] for v in gen.values()), gen
    assert all(v == [n_und] for v in und.values()), und
    # an understanding-only batch leaves every generation twin without gradient
    m.zero_grad(set_to_none=True)
    text_only = make_batch([vqa_sample(5), [Text([1, 2, 3]), Text([4, 5], loss=True)]])
    m(text_only).ce.mean().backward()
    for name, p in m.language_model.named_parameters():
        if "_moe_gen" in name:
            assert p.grad is None, name
        elif "layers.1.mlp." in name or "q_proj.weight" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    del out


def _grads(model, batch, vae_trainable: bool):
    model.zero_grad(set_to_none=True)
    if vae_trainable:
        lat = model.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
    else:
        with torch.no_grad():
            lat = model.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
    out = model(batch, lat, noise=noise_for(batch, model.config.latent_channels, 1))
    (out.ce.mean() + out.mse.mean()).backward()
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in model.named_parameters()}


UND_TWIN_PARTS = ("q_proj.", "k_proj.", "v_proj.", "o_proj.", "q_norm.", "k_norm.", "mlp.", "input_layernorm.",
                  "post_attention_layernorm.")


def _is_und_expert(name: str) -> bool:
    if not name.startswith("language_model.model."):
        return name.startswith(("vit_model.", "connector."))
    if "_moe_gen" in name:
        return False
    return name.endswith(("embed_tokens.weight", "model.norm.weight")) or any(p in name for p in UND_TWIN_PARTS)


@pytest.mark.parametrize("flags", [
    {}, {"freeze_llm": True}, {"freeze_vit": True}, {"freeze_vae": False}, {"freeze_und": True},
    {"freeze_llm": True, "freeze_vit": True},
])
def test_gradients_reach_exactly_the_intended_parameters(flags):
    m = tiny_model(4)
    with torch.no_grad():
        m.llm2vae.weight.normal_(0, 0.05)  # zero-init would block the MSE path into the generation expert
    summary = apply_freeze(m, **flags)
    assert summary["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    batch = make_batch([vqa_sample(0), edit_sample(1)])
    got = _grads(m, batch, vae_trainable=not flags.get("freeze_vae", True))
    for name, has in got.items():
        if name.endswith("pos_embed.pos_embed"):
            want = False
        elif name.startswith("vae_model."):
            want = not flags.get("freeze_vae", True) and name.startswith("vae_model.encoder.")
        elif name.startswith("language_model.") and flags.get("freeze_llm"):
            want = False
        elif name.startswith("vit_model.") and flags.get("freeze_vit"):
            want = False
        elif flags.get("freeze_und") and _is_und_expert(name):
            want = False
        else:
            want = True
        assert has == want, (name, has, want)
    if flags.get("freeze_und"):  # activation detaching only: requires_grad untouched
        assert m.language_model.model.layers[0].mlp.up_proj.weight.requires_grad


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_attention_backends_agree_with_sdpa(backend):
    """flex runs on CPU in torch 2.13 forward-only (no CPU backward), so this compares outputs under no_grad;
    `varlen` is the split-gather plan that the flash-attn backend uses on CUDA, with a torch kernel."""
    m = tiny_model(5)
    with torch.no_grad():
        m.llm2vae.weight.normal_(0, 0.05)
    batch = build_packed_batch(real_samples(), PACK, TOK, seed=11)
    lat = per_image_latent(m, batch)
    noise = noise_for(batch, m.config.latent_channels, 2)
    with torch.no_grad():
        ref = m(batch, lat, noise=noise)
        m.config.attn_backend = backend
        flex_batch = build_packed_batch(real_samples(), replace(PACK, use_flex=True), TOK, seed=11)
        assert flex_batch.nested_attention_masks is None and sum(flex_batch.sample_lens) == PACK.max_num_tokens
        got = m(flex_batch, lat, noise=noise)
    torch.testing.assert_close(got.ce, ref.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mse, ref.mse, rtol=1e-5, atol=1e-5)


def test_sdpa_builds_masks_when_the_batch_has_none():
    m = tiny_model(6)
    b = make_batch([vqa_sample(0), edit_sample(1)])
    b2 = make_batch([vqa_sample(0), edit_sample(1)], nested_masks=False)
    noise = noise_for(b, m.config.latent_channels, 0)
    lat = per_image_latent(m, b)
    with torch.no_grad():
        a, c = m(b, lat, noise=noise), m(b2, lat, noise=noise)
    torch.testing.assert_close(a.ce, c.ce)
    torch.testing.assert_close(a.mse, c.mse)
    assert PackedAttention.from_batch(b2).backend == "sdpa"


def test_visual_switches_skip_unused_paths():
    und_only = tiny_model(7, visual_gen=False)
    assert not hasattr(und_only, "vae_model") and not hasattr(und_only, "llm2vae")
    out = und_only(make_batch([vqa_sample(0)]))
    assert out.mse is None and out.ce.shape[0] == 6
    gen_only = tiny_model(7, visual_und=False)
    assert not hasattr(gen_only, "vit_model")
    b = make_batch([[Text([1, 2, 3]), Text([7, 8], loss=True)]])
    assert gen_only(b).ce.shape[0] == 3


def test_copy_init_moe_and_missing_latent_error():
    m = tiny_model(8)
    assert m.init_moe() > 0
    layer = m.language_model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, layer.self_attn.q_proj_moe_gen.weight)
    assert torch.equal(layer.mlp.down_proj.weight, layer.mlp_moe_gen.down_proj.weight)
    with pytest.raises(ValueError, match="padded_latent"):
        m(make_batch([edit_sample(1)]))
