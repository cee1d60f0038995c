"""Forward/backward of the tiny unified model on packed batches: shapes, gradients per freeze option,
llm2vae zero-init, MoT routing, packing invisibility and noise-split isolation."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.freeze import apply_freeze
from model.unified import UnifiedModel
from test_model_batches import Text, Vae, Vit, edit_sample, make_batch, rand_image, vqa_sample


def tiny_model(seed: int = 0, **overrides) -> UnifiedModel:
    torch.manual_seed(seed)
    m = UnifiedModel(ModelConfig.tiny(**overrides))
    return m


def encode(m, batch, seed=0):
    with torch.no_grad():
        return m.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(seed))


def test_forward_backward_shapes_and_llm2vae_zero_init():
    m = tiny_model()
    assert torch.count_nonzero(m.llm2vae.weight) == 0 and torch.count_nonzero(m.llm2vae.bias) == 0
    b = make_batch([vqa_sample(0), edit_sample(1)])
    out = m(b, encode(m, b))
    assert out.ce.shape == (b.num_ce_tokens,)
    assert out.mse.shape == (b.num_mse_tokens, m.config.latent_channels)
    (out.ce.mean() + out.mse.mean()).backward()
    assert m.llm2vae.weight.grad.abs().sum() > 0
