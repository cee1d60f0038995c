"""The unified model (BAGEL / UniMedVL, docs/upstream-compat.md#forward-pass): one packed sequence in, per-token CE and
per-element MSE out.

Submodule names are the upstream checkpoint prefixes (docs/upstream-compat.md#state-dict-keys): `language_model`, `vit_model`,
`connector`, `vit_pos_embed`, `vae2llm`, `llm2vae`, `time_embedder`, `latent_pos_embed`, and (UniMedVL)
`vae_model`. The VAE is always attached as `vae_model` when `visual_gen` is on, so `.to(device)` moves it;
checkpoint code leaves its weights out of `model.safetensors` while it is frozen (they live in
`ae.safetensors`), which is what upstream does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.packing.packed_batch import PackedBatch

from .attention import PackedAttention
from .autoencoder import AutoEncoder
from .config import ModelConfig
from .embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from .qwen2 import Qwen2ForCausalLM, Qwen2RMSNorm, TokenRoute
from .siglip import SiglipVisionModel


@dataclass
class ModelOutput:
    ce: torch.Tensor | None    # [N_ce] per-token cross-entropy (no reduction)
    mse: torch.Tensor | None   # [N_mse, p*p*z] per-element squared error


def patchify_latent(latent: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """[z, >=h*p, >=w*p] -> [h*w, p*p*z]: crop the padding, then (row, col, p, q, channel) order (docs/upstream-compat.md#forward-pass)."""
    z = latent.shape[0]
    x = latent[:, : h * p, : w * p].reshape(z, h, p, w, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * z)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `patchify_latent`: [h*w, p*p*z] -> [z, h*p, w*p]."""
    z = tokens.shape[1] // (p * p)
    x = tokens.reshape(h, w, p, p, z)
    return torch.einsum("hwpqc->chpwq", x).reshape(z, h * p, w * p)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t <- s*t / (1 + (s-1)*t) (docs/upstream-compat.md#flow-matching)."""
    return shift * t / (1 + (shift - 1) * t)


class UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        llm = config.llm
        H = llm.hidden_size
        self.hidden_size = H
        self.language_model = Qwen2ForCausalLM(llm)
        if config.visual_und:
            self.vit_model = SiglipVisionModel(config.vit)
            self.connector = MLPconnector(config.vit.hidden_size, H, config.connector_act)
            self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, H)
        if config.visual_gen:
            p2z = config.latent_channels
            self.vae2llm = nn.Linear(p2z, H)
            self.llm2vae = nn.Linear(H, p2z)
            self.time_embedder = TimestepEmbedder(H)
            self.latent_pos_embed = PositionEmbedding(config.max_latent_size, H)
            self.vae_model = AutoEncoder(config.vae)
        self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """HF-style init (normal(0, initializer_range) for Linear/Embedding in the LLM and heads, PyTorch
        defaults elsewhere); llm2vae zero-initialised (docs/upstream-compat.md#model-components); sin-cos tables rebuilt. No-op on meta."""
        if any(p.is_meta for p in self.parameters()):
            return
        std = self.config.llm.initializer_range
        with torch.no_grad():
            for module in self.language_model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, std)
                elif isinstance(module, Qwen2RMSNorm):
                    module.weight.fill_(1.0)
            if self.config.visual_gen:
                self.llm2vae.weight.zero_()
                self.llm2vae.bias.zero_()
        for module in self.modules():
            if isinstance(module, PositionEmbedding):
                module.reset_table()

    def reset_buffers(self) -> None:
        """Recompute what checkpoints do not hold: RoPE inv_freq and the sin-cos tables (after `to_empty`)."""
        rotary = self.language_model.model.rotary_emb
        rotary.inv_freq = rotary._inv_freq(rotary.inv_freq.device)
        for module in self.modules():
            if isinstance(module, PositionEmbedding):
                module.reset_table()

    def init_moe(self) -> int:
        """copy_init_moe (docs/upstream-compat.md#model-construction): generation twins start as copies of their understanding weights."""
        return self.language_model.init_moe()

    def adapt_to_tokenizer(self, tokenizer) -> bool:
        """Resize embeddings only when the tokenizer really added tokens (docs/upstream-compat.md#model-construction, #special-tokens)."""
        if getattr(tokenizer, "num_added_tokens", 0) <= 0:
            return False
        if tokenizer.vocab_size <= self.config.llm.vocab_size:
            return False
        self.language_model.resize_token_embeddings(tokenizer.vocab_size)
        return True

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Non-reentrant checkpointing of decoder and ViT layers (docs/upstream-compat.md#distribution)."""
        self.language_model.model.gradient_checkpointing = enabled
        if self.config.visual_und:
            self.vit_model.vision_model.gradient_checkpointing = enabled

    # -- embedding stages (also used by the inference path) -----------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, tokens: torch.Tensor, seqlens, position_ids: torch.Tensor) -> torch.Tensor:
        """Patchified pixels -> LLM-width ViT tokens (ViT, connector, + vit_pos_embed)."""
        feats = self.vit_model(tokens, seqlens, position_ids)
        return self.connector(feats) + self.vit_pos_embed(position_ids).to(feats.dtype)

    def embed_latent(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Noised latent tokens [N, p*p*z] at (shifted) times t -> LLM-width tokens."""
        x = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
        return x + self.time_embedder(t).to(x.dtype) + self.latent_pos_embed(position_ids).to(x.dtype)

    def latent_tokens(self, padded_latent: torch.Tensor, shapes) -> torch.Tensor:
        """x0: every image's latent cropped to its shape and patchified, concatenated in order."""
        p = self.config.latent_patch_size
        return torch.cat([patchify_latent(padded_latent[i], int(h), int(w), p) for i, (h, w) in enumerate(shapes)])

    # -- training forward ---------------------------------------------------------------------
    def forward(self, batch: PackedBatch, padded_latent: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> ModelOutput:
        """docs/upstream-compat.md#forward-pass on one packed batch.

        `padded_latent` = `vae_model.encode(batch.padded_images)` (the trainer decides on gradients).
        `noise` ([N_vae, p*p*z], the rows of every VAE token in sequence order) fixes eps; otherwise it is
        drawn from torch's global RNG.
        """
        cfg = self.config
        L = batch.sequence_length
        text_idx = batch.packed_text_indexes
        device = text_idx.device
        dtype = self.language_model.model.embed_tokens.weight.dtype
        x = torch.zeros(L, self.hidden_size, device=device, dtype=dtype)
        x = x.index_copy(0, text_idx, self.embed_text(batch.packed_text_ids))
        und_parts = [text_idx]

        if cfg.visual_und and batch.has_vit:
            vit = self.embed_vit(batch.packed_vit_tokens, batch.vit_token_seqlens, batch.packed_vit_position_ids)
            x = x.index_copy(0, batch.packed_vit_token_indexes, vit.to(dtype))
            und_parts.append(batch.packed_vit_token_indexes)

        gen_idx = None
        x0 = eps = t = None
        vae_idx = batch.packed_vae_token_indexes
        if cfg.visual_gen and vae_idx is not None and vae_idx.numel() > 0:
            if padded_latent is None:
                raise ValueError("the batch has VAE tokens: pass padded_latent = model.vae_model.encode(padded_images)")
            x0 = self.latent_tokens(padded_latent, batch.patchified_vae_latent_shapes)
            if x0.shape[0] != vae_idx.numel():
                raise ValueError(f"latent shapes give {x0.shape[0]} tokens but the batch has {vae_idx.numel()} "
                                 f"VAE token indexes")
            if noise is None:
                eps = torch.randn_like(x0)
            else:
                if noise.shape != x0.shape:
                    raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)}")
                eps = noise.to(device=x0.device, dtype=x0.dtype)
            t = shift_timesteps(torch.sigmoid(batch.packed_timesteps.to(x0.device).float()), cfg.timestep_shift)
            t = t.to(x0.dtype)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
            x = x.index_copy(0, vae_idx, self.embed_latent(x_t, t, batch.packed_latent_position_ids).to(dtype))
            gen_idx = vae_idx

        route = TokenRoute(und=torch.cat(und_parts) if gen_idx is not None else None, gen=gen_idx)
        attend = PackedAttention.from_batch(batch, cfg.attn_backend, device)
        h = self.language_model(x, route, batch.packed_position_ids, attend)

        mse = None
        if x0 is not None and batch.mse_loss_indexes is not None and batch.mse_loss_indexes.numel() > 0:
            pred = self.llm2vae(h[batch.mse_loss_indexes])
            target = (eps - x0)[t > 0]
            if target.shape[0] != pred.shape[0]:
                raise ValueError(f"{pred.shape[0]} mse_loss_indexes but {target.shape[0]} noised VAE tokens (t > 0)")
            mse = (pred.float() - target.float()) ** 2
        ce = None
        if batch.ce_loss_indexes is not None and batch.ce_loss_indexes.numel() > 0:
            logits = self.language_model.lm_head(h[batch.ce_loss_indexes])
            ce = F.cross_entropy(logits.float(), batch.packed_label_ids, reduction="none")
        return ModelOutput(ce=ce, mse=mse)
