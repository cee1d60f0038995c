"""Connector MLP, fixed 2-D sin-cos position tables and the timestep embedder (docs/upstream-compat.md#model-components, #position-encodings)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .siglip import activation


class MLPconnector(nn.Module):
    """ViT features -> LLM width: Linear, gelu-tanh, Linear (upstream class name, an FSDP/checkpoint unit)."""

    def __init__(self, in_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, dim]: [sin(pos*w_k) ..., cos(pos*w_k) ...], w_k = 10000^(-k/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_table(hidden: int, side: int) -> torch.Tensor:
    """[side*side, hidden]; index r*side + c; first half encodes the column, second half the row (docs/upstream-compat.md#position-encodings)."""
    if hidden % 4:
        raise ValueError(f"hidden size {hidden} must be divisible by 4 for the 2-D sin-cos table")
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return torch.cat([sincos_1d(hidden // 2, cols), sincos_1d(hidden // 2, rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """A frozen sin-cos table (`pos_embed`, requires_grad False). Dropped from loaded checkpoints and rebuilt."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int) -> None:
        super().__init__()
        self.max_num_patch_per_side, self.hidden_size = max_num_patch_per_side, hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(max_num_patch_per_side ** 2, hidden_size), requires_grad=False)
        self.reset_table()

    def reset_table(self) -> None:
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.hidden_size, self.max_num_patch_per_side))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256 sinusoidal features [cos, sin] (no x1000 scaling) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    @staticmethod
    def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = self.timestep_features(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)
