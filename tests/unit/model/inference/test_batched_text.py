"""Batched KV-cache decoding gives the same tokens as decoding each prompt alone (random tiny model, prompts
of different lengths, with and without an image, different max_new_tokens)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from datasets_catalog.plan import Message
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs
from model.checkpoint import save_weights, write_inference_files
from model.config import ModelConfig
from model.inference.api import VQAInferencer
from model.inference.batched_text import generate_text_batch
from model.inference.text_generation import generate_text
from model.unified import UnifiedModel

IMAGES = Path(__file__).resolve().parents[4] / "examples" / "radiology" / "images"
VIT = ImageTransformArgs(56, 28, 14, 56 * 56)


def _ckpt(directory: Path) -> Path:
    tok = TextTokenizer.builtin()
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig.tiny(vocab_size=tok.vocab_size)).eval()
    save_weights(model, directory / "ema.safetensors", include_vae=False)
    save_file({k: v.contiguous() for k, v in model.vae_model.state_dict().items()}, str(directory / "ae.safetensors"))
    write_inference_files(directory, model.config, tok)
    return directory


def test_batched_decoding_equals_one_at_a_time(tmp_path):
    vqa = VQAInferencer(_ckpt(tmp_path), vit_transform=VIT, device="cpu", dtype="fp32")
    prompts = [([IMAGES / "ct/ct_small_bone.png"], "<image>\nDescribe the vertebral body."),
               ([], "What is a bone window?"),
               ([IMAGES / "ct/ct_small_soft_tissue.png"], "<image>\nWhich plane is shown? Answer briefly, please.")]
    sessions = [vqa.prepare(images, [Message("human", text)]) for images, text in prompts]
    limits = [12, 5, 20]
    batched = generate_text_batch(vqa.model, [s.cond for s in sessions], vqa.tokenizer.special, limits)
    for s, limit, got in zip(sessions, limits, batched):
        alone = generate_text(vqa.model, s.cond, vqa.tokenizer.special, max_new_tokens=limit)
        assert got.ids == alone.ids and got.stopped_at_eos == alone.stopped_at_eos
        assert got.context.rope == alone.context.rope and got.context.kv_len == alone.context.kv_len
    # the public path: answer_batch == chat(greedy) per prompt
    answers = vqa.answer_batch(sessions, max_new_tokens=8)
    assert answers == [vqa.chat(images, [Message("human", text)], max_new_tokens=8, do_sample=False)
                       for images, text in prompts]
