"""KV-cache inference on a random tiny model: cached decoding equals recomputing the whole sequence, seeded
determinism, CFG arithmetic (scales at 1, the three renorm modes by hand), the Euler sampler, output sizes,
and the user-facing errors. Real torch, real image decoding, real checkpoint files."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs, resize_target
from model.attention import PackedAttention, TokenLayout
from model.checkpoint import save_weights, write_inference_files
from model.config import ModelConfig
from model.inference import image_sampler as sampler
from model.inference.api import ImageGenerator, VQAInferencer
from model.inference.image_sampler import SamplerParams, guide_velocity, schedule
from model.inference.interleave import Session
from model.inference.kv_cache import encode_vae_image, latent_position_ids
from model.inference.loading import InferenceError
from model.inference.text_generation import generate_text
from model.qwen2 import TokenRoute
from model.unified import UnifiedModel
from pipelines.imaging.decode import image_to_tensor, load_image_rgb
from pipelines.packing.ops import patchify
from pipelines.packing.position_ids import get_flattened_position_ids

ROOT = Path(__file__).resolve().parents[4]
IMAGES = ROOT / "examples" / "radiology" / "images"
VAE = ImageTransformArgs(64, 32, 16)
VIT = ImageTransformArgs(56, 28, 14, 56 * 56)


def _random_model(max_positions: int = 4096) -> tuple[UnifiedModel, TextTokenizer]:
    tok = TextTokenizer.builtin()
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size)
    cfg.llm.max_position_embeddings = max_positions
    torch.manual_seed(0)
    model = UnifiedModel(cfg)
    with torch.no_grad():  # llm2vae starts at zero (docs/upstream-compat.md#model-components): give the velocity head something to say
        model.llm2vae.weight.normal_(0.0, 0.05)
    return model.eval(), tok


def _write_ckpt(directory: Path, model: UnifiedModel, tok: TextTokenizer) -> Path:
    save_weights(model, directory / "ema.safetensors", include_vae=False)
    save_file({k: v.contiguous() for k, v in model.vae_model.state_dict().items()}, str(directory / "ae.safetensors"))
    write_inference_files(directory, model.config, tok)
    return directory


@pytest.fixture(scope="module")
def tiny():
    return _random_model()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    return _write_ckpt(tmp_path_factory.mktemp("ckpt"), *tiny)


@pytest.fixture(scope="module")
def generator(ckpt):
    return ImageGenerator(ckpt, vae_transform=VAE, vit_transform=VIT)


@pytest.fixture(scope="module")
def vqa(ckpt):
    return VQAInferencer(ckpt, vit_transform=VIT)


# -- cached decoding == recomputing the full context every step --------------------------------------

def _segments(model, tok, image, prompt: str, vae_seed: int):
    """The context as (embeddings, positions, attention mode, is-gen mask) segments, built straight from the
    model's embedding stages (no KV cache), as the training forward would see the sequence."""
    sp = tok.special
    emb = model.embed_text
    W, H = resize_target(image.width, image.height, VAE)
    image = image.resize((W, H), resample=3)
    segs, rope = [], 0
    # VAE image: start + clean latents (t = 0) + end, one rope, gen route for the latents
    lat, _, _ = encode_vae_image(model, image, VAE, torch.Generator().manual_seed(vae_seed))
    x = torch.cat([emb(torch.tensor([sp.start_of_image])),
                   model.embed_latent(lat, torch.zeros(lat.shape[0]), latent_position_ids(model, H, W, "cpu")),
                   emb(torch.tensor([sp.end_of_image]))])
    gen = torch.zeros(x.shape[0], dtype=torch.bool)
    gen[1:-1] = True
    segs.append((x, torch.full((x.shape[0],), rope), "full", gen))
    rope += 1
    # ViT image
    vw, vh = resize_target(W, H, VIT)
    patches = patchify(image_to_tensor(image, vw, vh), 14)
    pos = get_flattened_position_ids(vh, vw, 14, model.config.vit_max_num_patch_per_side)
    x = torch.cat([emb(torch.tensor([sp.start_of_image])), model.embed_vit(patches, [patches.shape[0]], pos),
                   emb(torch.tensor([sp.end_of_image]))])
    segs.append((x, torch.full((x.shape[0],), rope), "full", torch.zeros(x.shape[0], dtype=torch.bool)))
    rope += 1
    ids = [sp.bos, *tok.encode(prompt), sp.eos]
    segs.append((emb(torch.tensor(ids)), torch.arange(rope, rope + len(ids)), "causal",
                 torch.zeros(len(ids), dtype=torch.bool)))
    return segs, rope + len(ids)


@torch.no_grad()
def _recompute_logits(model, segs, rope: int, tokens: list[int]) -> torch.Tensor:
    """Logits of the last position after running the WHOLE sequence (context + bos + tokens) at once with
    the training attention (dense per-sample masks from split lengths and modes)."""
    tail = model.embed_text(torch.tensor(tokens))
    parts = [*segs, (tail, torch.arange(rope, rope + len(tokens)), "causal",
                     torch.zeros(len(tokens), dtype=torch.bool))]
    x = torch.cat([p[0] for p in parts])
    pos = torch.cat([p[1] for p in parts])
    gen = torch.cat([p[3] for p in parts])
    L = x.shape[0]
    layout = TokenLayout.build(L, [L], [p[0].shape[0] for p in parts], [p[2] for p in parts])
    idx = torch.arange(L)
    route = TokenRoute(und=idx[~gen], gen=idx[gen])
    h = model.language_model(x, route, pos, PackedAttention(layout, "sdpa"))
    return model.language_model.lm_head(h[-1]).float()


def test_cached_generation_equals_full_recompute(tiny):
    model, tok = tiny
    image = load_image_rgb(None, IMAGES / "ct" / "ct_small_bone.png")
    prompt = "Describe the vertebral body."
    s = Session(model, tok, VAE, VIT, understanding_output=False, seed=5)
    s.add_image(image)
    s.add_text(prompt)
    n = 12
    cached = generate_text(model, s.cond, tok.special, max_new_tokens=n, do_sample=False)
    segs, rope = _segments(model, tok, image, prompt, vae_seed=5)
    assert s.cond.rope == rope and s.cond.kv_len == sum(p[0].shape[0] for p in segs)
    fed = [tok.special.bos]
    recomputed = []
    for _ in range(n):
        logits = _recompute_logits(model, segs, rope, fed)
        nxt = int(torch.argmax(logits))
        if nxt == tok.special.eos:
            break
        recomputed.append(nxt)
        fed.append(nxt)
    assert cached.ids == recomputed and len(recomputed) == n
    # and the logits themselves agree at the last step (cache vs recompute, fp32)
    from model.inference.kv_cache import step_token
    ctx = s.cond
    for t in [tok.special.bos, *cached.ids[:-1]]:
        last, ctx = step_token(model, ctx, t)
    ref = _recompute_logits(model, segs, rope, [tok.special.bos, *cached.ids[:-1]])
    assert torch.allclose(last, ref, atol=1e-4, rtol=1e-4)


def test_latent_query_equals_the_training_attention(tiny):
    """The generation query (start + noisy latents + end, gen route, cache not updated) predicts the same
    velocity as running the whole sequence with the target as a training `noise` split."""
    model, tok = tiny
    image = load_image_rgb(None, IMAGES / "pathology" / "he_tile0.png")
    s = Session(model, tok, VAE, VIT, understanding_output=False, seed=2)
    s.add_image(image)
    s.add_text("Translate the stain.")
    segs, rope = _segments(model, tok, image, "Translate the stain.", vae_seed=2)
    g = torch.Generator().manual_seed(9)
    x_t, t = torch.randn(16, 64, generator=g), 0.6
    before = (s.cond.kv_len, [k.clone() for k in s.cond.keys])
    cached = sampler.latent_velocity(model, s.cond, x_t, t, 64, 64, tok.special)
    assert s.cond.kv_len == before[0] and all(torch.equal(a, b) for a, b in zip(s.cond.keys, before[1]))
    sp = tok.special
    q = torch.cat([model.embed_text(torch.tensor([sp.start_of_image])),
                   model.embed_latent(x_t, torch.full((16,), t), latent_position_ids(model, 64, 64, "cpu")),
                   model.embed_text(torch.tensor([sp.end_of_image]))])
    gen = torch.zeros(18, dtype=torch.bool)
    gen[1:-1] = True
    parts = [*segs, (q, torch.full((18,), rope), "noise", gen)]
    x = torch.cat([p[0] for p in parts])
    L = x.shape[0]
    is_gen = torch.cat([p[3] for p in parts])
    layout = TokenLayout.build(L, [L], [p[0].shape[0] for p in parts], [p[2] for p in parts])
    idx = torch.arange(L)
    with torch.no_grad():
        h = model.language_model(x, TokenRoute(und=idx[~is_gen], gen=idx[is_gen]), torch.cat([p[1] for p in parts]),
                                 PackedAttention(layout, "sdpa"))
        full = model.llm2vae(h[L - 17:L - 1]).float()
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-4)


def test_sampled_decoding_is_seeded(tiny):
    model, tok = tiny
    s = Session(model, tok, VAE, VIT, understanding_output=True, seed=1)
    s.add_text("Which imaging modality is shown?")

    def draw(seed):
        return generate_text(model, s.cond, tok.special, max_new_tokens=16, do_sample=True, temperature=1.0,
                             generator=torch.Generator().manual_seed(seed)).ids

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


# -- same seed -> same text, same image (public API on a checkpoint directory) ---------------------------

def test_same_seed_same_text_and_image(vqa, generator):
    image = IMAGES / "ct" / "ct_small_lung.png"
    a = vqa.infer_single(image, "What does the lung window emphasise?", max_new_tokens=16, seed=11)
    b = vqa.infer_single(image, "What does the lung window emphasise?", max_new_tokens=16, seed=11)
    c = vqa.infer_single(image, "What does the lung window emphasise?", max_new_tokens=16, seed=12)
    assert a == b and a != c
    kw = dict(num_timesteps=4, max_think_token_n=4, understanding="append", text_do_sample=True, text_temperature=1.0)
    r1 = generator.infer_single(image, "Add a small nodule.", seed=7, **kw)
    r2 = generator.infer_single(image, "Add a small nodule.", seed=7, **kw)
    r3 = generator.infer_single(image, "Add a small nodule.", seed=8, **kw)
    assert r1.understanding == r2.understanding and r1.image.tobytes() == r2.image.tobytes()
    assert torch.equal(r1.latent, r2.latent)
    assert not torch.equal(r1.latent, r3.latent)


def test_output_size_follows_input_aspect_ratio(generator):
    us = IMAGES / "us" / "us_frame00.jpg"   # 320 x 240
    r = generator.infer_single(us, "Sharpen the image.", num_timesteps=2, understanding="none", cfg_text_scale=1.0)
    w, h = resize_target(320, 240, VAE)     # the VAE resize rule: 64 x 48
    assert (r.width, r.height) == (w, h) == r.image.size == (64, 48)
    assert r.image.mode == "RGB" and r.latent.shape == (h // 16 * (w // 16), 64)
    t2i = generator.infer_single(None, "A fundus photograph.", num_timesteps=2, cfg_text_scale=1.0,
                                 image_shape=(32, 48))
    assert t2i.image.size == (48, 32) and t2i.thought is None


def test_think_mode_returns_the_thought(generator):
    r = generator.infer_single(IMAGES / "ct" / "ct_small_bone.png", "Add a fracture line.", num_timesteps=2,
                               use_thinking=True, max_think_token_n=5, cfg_text_scale=1.0)
    assert isinstance(r.thought, str) and r.understanding is None
    assert r.instruction.startswith("Add a fracture line.") and "Based on analysis: " in r.instruction or not r.thought
    t2i = generator.infer_single(None, "A chest X-ray.", num_timesteps=2, use_thinking=True, max_think_token_n=3,
                                 cfg_text_scale=1.0, image_shape=(32, 32))
    assert isinstance(t2i.thought, str)


# -- CFG arithmetic ----------------------------------------------------------------------------------

def test_scales_at_one_give_the_conditional_velocity(tiny, monkeypatch):
    g = torch.Generator().manual_seed(0)
    v, vtu, viu = (torch.randn(6, 64, generator=g) for _ in range(3))
    for renorm in sampler.RENORM_TYPES:
        assert torch.equal(guide_velocity(v, vtu, viu, 1.0, 1.0, renorm), v)
        assert torch.equal(guide_velocity(v, vtu, viu, 1.0, 3.0, renorm), v)  # quirk: text <= 1 -> no guidance

    model, tok = tiny
    s = Session(model, tok, VAE, VIT, seed=0)
    s.add_image(load_image_rgb(None, IMAGES / "ct" / "ct_small_bone.png"))
    s.add_text("Add a nodule.")
    ctxs = sampler.GuidanceContexts(s.cond, s.text_uncond, s.img_uncond)
    calls = []
    real = sampler.latent_velocity

    def spy(model_, ctx, *a, **k):
        calls.append(ctx)
        return real(model_, ctx, *a, **k)

    monkeypatch.setattr(sampler, "latent_velocity", spy)
    x = torch.randn(16, 64, generator=g)
    cond = real(model, s.cond, x, 0.7, 64, 64, tok.special)
    assert cond.abs().sum() > 0
    cases = [(SamplerParams(cfg_text_scale=1.0, cfg_img_scale=1.0), 0.7, 1),
             (SamplerParams(cfg_text_scale=1.0, cfg_img_scale=2.0), 0.7, 1),
             (SamplerParams(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.4, 1.0)), 0.3, 1)]
    for params, t, n_calls in cases:
        calls.clear()
        v = sampler.velocity_at(model, ctxs, x, t, 64, 64, tok.special, params)
        assert torch.equal(v, real(model, s.cond, x, t, 64, 64, tok.special)) and len(calls) == n_calls
    calls.clear()
    guided = sampler.velocity_at(model, ctxs, x, 0.7, 64, 64, tok.special, SamplerParams(4.0, 2.0))
    assert [c is s for c in calls] == [False] * 3 and len(calls) == 3
    assert calls[0] is s.cond and calls[1] is s.text_uncond and calls[2] is s.img_uncond
    assert not torch.allclose(guided, cond)
    # the three contexts really differ: text-uncond lacks the instruction, img-uncond lacks the image
    assert s.text_uncond.kv_len < s.cond.kv_len and s.img_uncond.kv_len < s.cond.kv_len
    assert s.img_uncond.rope == 2 + len(tok.encode("Add a nodule.")) and s.text_uncond.rope == 2


def test_renorm_modes_by_hand():
    v = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    vtu = torch.zeros(2, 2)
    viu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # v_txt = vtu + 2 (v - vtu) = [[6, 8], [0, 2]]; v' = viu + 1.5 (v_txt - viu) = [[8.5, 12], [0, 3]]
    v_prime = torch.tensor([[8.5, 12.0], [0.0, 3.0]])
    # global: one norm over everything: |v| = sqrt(26), |v'| = sqrt(225.25)
    out = guide_velocity(v, vtu, viu, 2.0, 1.5, "global")
    assert torch.allclose(out, v_prime * math.sqrt(26 / 225.25), atol=1e-6)
    # renorm_min clamps the ratio from below (0.34 -> 0.5); the ratio never exceeds 1
    out = guide_velocity(v, vtu, viu, 2.0, 1.5, "global", renorm_min=0.5)
    assert torch.allclose(out, v_prime * 0.5, atol=1e-6)
    # channel: per token: 5 / sqrt(216.25) and 1 / 3
    out = guide_velocity(v, vtu, viu, 2.0, 1.5, "channel")
    assert torch.allclose(out[0], v_prime[0] * 5 / math.sqrt(216.25), atol=1e-6)
    assert torch.allclose(out[1], v_prime[1] / 3, atol=1e-6)
    # text_channel: v_txt renormed per token against v (10 -> 5, 2 -> 1: both halved) = [[3, 4], [0, 1]],
    # then image CFG without renorm: [[1, 0], [0, 0]] + 1.5 ([[3, 4], [0, 1]] - [[1, 0], [0, 0]])
    out = guide_velocity(v, vtu, viu, 2.0, 1.5, "text_channel")
    assert torch.allclose(out, torch.tensor([[4.0, 6.0], [0.0, 1.5]]), atol=1e-6)
    # image scale <= 1: v' = v_txt (global: ratio sqrt(26) / sqrt(104) = 0.5)
    out = guide_velocity(v, vtu, viu, 2.0, 1.0, "global")
    assert torch.allclose(out, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), atol=1e-6)
    # a ratio above 1 is clamped to 1: guidance that shrinks v is kept as is
    small = guide_velocity(v, v * 2, None, 2.0, 1.0, "global")   # v_txt = 2v + 2(v - 2v) = 0
    assert torch.allclose(small, torch.zeros(2, 2))
    with pytest.raises(ValueError):
        guide_velocity(v, vtu, viu, 2.0, 1.5, "bogus")


def test_schedule_and_euler_steps(tiny, monkeypatch):
    t, dt = schedule(5, 3.0)
    assert t[0] == 1.0 and len(t) == 4
    assert math.isclose(float(t[1]), 3 * 0.75 / (1 + 2 * 0.75), rel_tol=1e-6)     # 0.9
    assert math.isclose(float(dt.sum()), 1.0, rel_tol=1e-6) and bool((dt > 0).all())
    assert math.isclose(float(schedule(3, 1.0)[0][1]), 0.5)                          # shift 1 = no shift
    # Euler: with a constant velocity c, x_end = x_0 - c * sum(dt) = x_0 - c, after T - 1 evaluations
    model, tok = tiny
    seen = []
    monkeypatch.setattr(sampler, "velocity_at", lambda *a, **k: (seen.append(a[3]), torch.full((4, 64), 0.25))[1])
    out = sampler.sample_latent(model, None, 32, 32, tok.special, SamplerParams(num_timesteps=6),
                                torch.Generator().manual_seed(3))
    x0 = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, x0 - 0.25, atol=1e-5) and len(seen) == 5 and seen[0] == 1.0
    with pytest.raises(ValueError, match="multiples of 16"):
        sampler.sample_latent(model, None, 40, 32, tok.special, SamplerParams(), None)


# -- user mistakes -----------------------------------------------------------------------------------

def test_missing_checkpoint_files_are_named(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "ae.safetensors").unlink()
    with pytest.raises(InferenceError, match=r"missing ae\.safetensors.*must contain"):
        ImageGenerator(broken)
    VQAInferencer(broken, vit_transform=VIT)   # VQA needs no VAE
    (broken / "ema.safetensors").unlink()
    (broken / "llm_config.json").unlink()
    with pytest.raises(InferenceError, match=r"missing llm_config\.json, ema\.safetensors \(or model\.safetensors\)"):
        VQAInferencer(broken)
    with pytest.raises(InferenceError, match="no such directory"):
        VQAInferencer(tmp_path / "nowhere")


def test_unreadable_image_and_long_prompt(vqa, tmp_path, generator):
    bad = tmp_path / "scan.png"
    bad.write_text("not an image")
    with pytest.raises(InferenceError, match=r"image .*scan\.png: cannot be read"):
        vqa.infer_single(bad, "What is shown?", max_new_tokens=2)
    with pytest.raises(InferenceError, match=r"image .*missing\.png: no such file"):
        generator.infer_single(tmp_path / "missing.png", "Edit.", num_timesteps=2)


def test_prompt_longer_than_context_is_refused(tmp_path):
    model, tok = _random_model(max_positions=64)
    d = _write_ckpt(tmp_path / "short", model, tok)
    inf = VQAInferencer(d, vit_transform=VIT)
    with pytest.raises(InferenceError, match=r"the prompt is 102 tokens.*context of 64 positions"):
        inf.infer_single(None, "x" * 100, max_new_tokens=2)
    assert isinstance(inf.infer_single(None, "short", max_new_tokens=100), str)   # generation stops at the end


# -- properties of the guidance arithmetic and the flag parser (hypothesis) ---------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model.inference.jobs_io import parse_transform  # noqa: E402

_scale = st.floats(min_value=0.0, max_value=8.0, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s_txt=_scale, s_img=_scale, renorm_min=st.floats(0.0, 1.0),
       tokens=st.integers(1, 5))
def test_guidance_properties(seed, s_txt, s_img, renorm_min, tokens):
    g = torch.Generator().manual_seed(seed)
    v, vtu, viu = (torch.randn(tokens, 8, generator=g, dtype=torch.float64) for _ in range(3))
    if s_txt <= 1.0:
        for mode in sampler.RENORM_TYPES:
            assert torch.equal(guide_velocity(v, vtu, viu, s_txt, s_img, mode, renorm_min), v)
        return
    # with renorm_min = 0 the renorm never lets the guided velocity grow past the conditional one
    glob = guide_velocity(v, vtu, viu, s_txt, s_img, "global")
    assert float(glob.norm()) <= float(v.norm()) * (1 + 1e-9) + 1e-12
    chan = guide_velocity(v, vtu, viu, s_txt, s_img, "channel")
    assert bool((chan.norm(dim=-1) <= v.norm(dim=-1) * (1 + 1e-9) + 1e-12).all())
    # and it only ever rescales v' (global: one factor for everything, channel: one per token)
    v_txt = vtu + s_txt * (v - vtu)
    v_new = viu + s_img * (v_txt - viu) if s_img > 1.0 else v_txt
    ratio = (v.norm() / (v_new.norm() + 1e-8)).clamp(renorm_min, 1.0)
    assert torch.allclose(guide_velocity(v, vtu, viu, s_txt, s_img, "global", renorm_min), v_new * ratio)


@settings(max_examples=40, deadline=None)
@given(mx=st.integers(1, 2048), mn=st.integers(1, 2048), stride=st.integers(1, 64),
       pixels=st.one_of(st.none(), st.integers(1, 10**7)))
def test_parse_transform(mx, mn, stride, pixels):
    text = f"{mx},{mn},{stride}" + (f",{pixels}" if pixels is not None else "")
    if mn > mx:
        with pytest.raises(InferenceError, match="min_image_size"):
            parse_transform(text, "--vit_transform")
        return
    args = parse_transform(text, "--vit_transform")
    assert (args.max_image_size, args.min_image_size, args.image_stride) == (mx, mn, stride)
    assert args.max_pixels == (pixels if pixels is not None else ImageTransformArgs(1, 1, 1).max_pixels)
    for bad in ("1,2", "a,b,c", "1,2,3,4,5", "0,0,16"):
        with pytest.raises(InferenceError, match="--vit_transform"):
            parse_transform(bad, "--vit_transform")


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=30, deadline=None)
@given(records=st.lists(st.one_of(
    st.builds(lambda paths, turns: {"input_img": [{"path": p} for p in paths],
                                    "message": [{"from": r, "value": v} for r, v in turns]},
              st.lists(st.sampled_from(["a.png", "/b/c.png", "d/e.png"]), max_size=2),
              st.lists(st.tuples(st.sampled_from(["human", "gpt"]), _text), min_size=1, max_size=3)),
    _text.map(lambda t: "#" + t)), min_size=1, max_size=6))
def test_batch_reader_never_raises_on_bad_lines(records, tmp_path_factory):
    """Every non-blank line gives either a record (paths joined to data_dir with the leading separator
    stripped, as upstream) or one error string; nothing raises."""
    import json as _json

    from model.inference.batch import instruction_of, read_records

    d = tmp_path_factory.mktemp("jsonl")
    lines = [r if isinstance(r, str) else _json.dumps(r) for r in records]
    (d / "in.jsonl").write_text("\n".join(x.replace("\n", " ") for x in lines), encoding="utf-8")
    out = list(read_records(d / "in.jsonl", d / "data"))
    assert len(out) == sum(1 for x in lines if x.replace("\n", " ").strip())
    for (n, rec, err), src in zip(out, [x for x in records if (x if isinstance(x, str) else "x").strip()]):
        assert (rec is None) != (err is None)
        if isinstance(src, dict):
            assert rec is not None and [m.value for m in rec.messages] == [v["value"] for v in src["message"]]
            assert [str(p) for p in rec.input_images] == [str(d / "data" / i["path"].lstrip("/"))
                                                          for i in src["input_img"]]
            human = [m["value"] for m in src["message"] if m["from"] == "human"]
            assert instruction_of(rec.messages) == (human[-1].replace("<image>", "").strip() if human else None)
        else:
            assert isinstance(err, str) and err
