"""The hooks a server needs (jobs/serve.py): `on_token` sees every answer token as it is generated, `on_step`
every Euler step, and a model loaded once serves both the VQA and the generation API. Callbacks never change
the result."""
from __future__ import annotations

import pytest

from model.inference.api import ImageGenerator, VQAInferencer
from model.inference.loading import load_for_inference

from .test_inference_core import IMAGES, VAE, VIT, _random_model, _write_ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _write_ckpt(tmp_path_factory.mktemp("ckpt_cb"), *_random_model())


def test_on_token_sees_the_answer_token_by_token(ckpt):
    vqa = VQAInferencer(ckpt, vit_transform=VIT)
    image, prompt = IMAGES / "ct" / "ct_small_lung.png", "What does the lung window emphasise?"
    plain = vqa.infer_single(image, prompt, max_new_tokens=12, do_sample=False)
    seen: list[int] = []
    hooked = vqa.infer_single(image, prompt, max_new_tokens=12, do_sample=False, on_token=seen.append)
    assert hooked == plain and 0 < len(seen) <= 12
    assert vqa.tokenizer.decode(seen, skip_special_tokens=True) == plain


def test_on_step_counts_the_euler_steps_and_one_model_serves_both(ckpt):
    loaded = load_for_inference(ckpt, visual_gen=True)
    gen = ImageGenerator(ckpt, vae_transform=VAE, vit_transform=VIT, loaded=loaded)
    steps: list[tuple[int, int]] = []
    kw = dict(num_timesteps=4, cfg_text_scale=1.0, image_shape=(32, 32), seed=3)
    hooked = gen.infer_single(None, "A fundus photograph.", on_step=lambda d, t: steps.append((d, t)), **kw)
    assert steps == [(1, 3), (2, 3), (3, 3)]         # 4 timesteps from t = 1 to t = 0: 3 Euler steps
    assert hooked.image.tobytes() == gen.infer_single(None, "A fundus photograph.", **kw).image.tobytes()

    shared = VQAInferencer(ckpt, vit_transform=VIT, loaded=loaded)
    assert shared.model is gen.model
    image, prompt = IMAGES / "ct" / "ct_small_bone.png", "Describe the bone."
    own = VQAInferencer(ckpt, vit_transform=VIT)
    assert shared.infer_single(image, prompt, max_new_tokens=8, do_sample=False) == \
        own.infer_single(image, prompt, max_new_tokens=8, do_sample=False)
