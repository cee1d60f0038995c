"""SigLIP NaViT vision encoder (docs/upstream-compat.md#model-components, #forward-pass).

Linear patch embedding over patchified pixels ([N, p*p*C] in (row, col, channel) order, docs/upstream-compat.md#patchify), a learned
position table indexed by position ids (row*70 + col), pre-LN encoder layers with per-image (varlen,
non-causal) attention, then post-LN. Only `num_layers_used` = n + 1 + select_layer layers are built (the last
layer is dropped, docs/upstream-compat.md#vit-layer-count). Names follow `vit_model.vision_model.*` (docs/upstream-compat.md#state-dict-keys).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flash_attn_available, varlen_attention
from .config import ViTConfig

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)  # conv converted to linear, docs/upstream-compat.md#checkpoint-loading
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(tokens.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        L = x.shape[0]
        q, k, v = (proj(x).view(L, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = varlen_attention(q, k, v, seqlens, seqlens, causal=False,
                               use_flash=x.is_cuda and flash_attn_available())
        return self.out_proj(out.reshape(L, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers_used)])


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.rope:
            raise ValueError("vit_rope=True is not supported (the released checkpoints use vit_rope=False)")
        if cfg.num_layers_used < 1:
            raise ValueError(f"the ViT keeps {cfg.num_layers_used} layers (num_hidden_layers="
                             f"{cfg.num_hidden_layers}, select_layer={cfg.select_layer}); need at least 1")
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, tokens: torch.Tensor, seqlens: list[int], position_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens, position_ids)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, seqlens, use_reentrant=False)
            else:
                x = layer(x, seqlens)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """`vit_model`: holds `vision_model` so the state-dict names match upstream."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, packed_pixel_values: torch.Tensor, seqlens, position_ids: torch.Tensor) -> torch.Tensor:
        """packed_pixel_values: [N, p*p*C]; seqlens: tokens per image; position_ids: [N]."""
        seqlens = [int(s) for s in (seqlens.tolist() if torch.is_tensor(seqlens) else seqlens)]
        return self.vision_model(packed_pixel_values, seqlens, position_ids)


def conv_to_linear_patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight [D, C, p, p] -> linear [D, p*p*C] with (row, col, channel) columns (docs/upstream-compat.md#checkpoint-loading)."""
    if weight.dim() != 4:
        return weight
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
