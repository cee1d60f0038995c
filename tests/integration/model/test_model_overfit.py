"""The tiny model overfits one packed batch (a VQA sample + an image-editing sample, real packer) on a CPU:
CE < 0.05; with noise and timesteps fixed MSE falls >= 90%; with fresh noise every step it falls clearly."""
from __future__ import annotations

import torch

from model.freeze import apply_freeze
from pipelines.packing.packer import build_packed_batch
from tests.unit.model.test_model_batches import single_thread  # noqa: F401  (autouse fixture)
from tests.unit.model.test_model_forward import PACK, TOK, noise_for, real_samples, tiny_model

STEPS = 200


def _train(fresh_noise: bool, steps: int = STEPS):
    model = tiny_model(0)
    apply_freeze(model)  # upstream defaults: VAE frozen, everything else trained
    batch = build_packed_batch(real_samples()[:2], PACK, TOK, seed=0)  # sft (VQA) + edit
    assert batch.num_ce_tokens > 0 and batch.num_mse_tokens > 0 and batch.has_vit
    with torch.no_grad():
        latent = model.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
    fixed = noise_for(batch, model.config.latent_channels, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95),
                            eps=1e-15, weight_decay=0.0)
    torch.manual_seed(123)  # fresh noise comes from torch's RNG
    ces, mses = [], []
    for _ in range(steps):
        out = model(batch, latent, noise=None if fresh_noise else fixed)
        ce, mse = out.ce.mean(), out.mse.mean()
        opt.zero_grad(set_to_none=True)
        (ce + mse).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ces.append(ce.item())
        mses.append(mse.item())
    return ces, mses


def test_tiny_model_overfits_one_vqa_plus_edit_batch(capsys):
    ces, mses = _train(fresh_noise=False)
    drop = 1 - mses[-1] / mses[0]
    ces_f, mses_f = _train(fresh_noise=True)
    start_f = sum(mses_f[:10]) / 10
    end_f = sum(mses_f[-20:]) / 20
    drop_f = 1 - end_f / start_f
    with capsys.disabled():
        print(f"\noverfit ({STEPS} steps, AdamW 3e-3): fixed noise: CE {ces[0]:.3f} -> {ces[-1]:.4f}, "
              f"MSE {mses[0]:.4f} -> {mses[-1]:.5f} ({drop:.1%} lower); fresh noise: CE {ces_f[-1]:.4f}, "
              f"MSE {start_f:.4f} (first 10) -> {end_f:.4f} (last 20) ({drop_f:.1%} lower)")
    assert ces[-1] < 0.05
    assert drop >= 0.90
    assert ces_f[-1] < 0.05
    assert drop_f >= 0.5
