"""Exponential moving average of the trainable weights (docs/upstream-compat.md#ema).

θ_ema ← d·θ_ema + (1 − d)·θ for every parameter that requires grad in the main model, in fp32 on whatever
shard each rank holds (DTensor shards under FSDP2 work unchanged). Frozen parameters and buffers (the
sin-cos tables) are never touched: they stay equal to the initial copy.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) model with grads off; kept in train mode like upstream's EMA."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> int:
    """One EMA step; returns how many tensors were updated. Both models must have the same parameter names."""
    ema_params = dict(ema.named_parameters())
    updated = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        e = ema_params.get(name)
        if e is None:
            raise KeyError(f"EMA model has no parameter {name}")
        if e.dtype == torch.float32 and p.dtype == torch.float32:
            e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        else:
            e.copy_((e.float() * decay + p.detach().float() * (1.0 - decay)).to(e.dtype))
        updated += 1
    return updated
