"""Loss normalisation (docs/upstream-compat.md#loss-normalisation): CE and MSE as global per-token means across ranks.

With W ranks whose gradients are averaged (DDP / FSDP), the local loss W·Σ_local / Σ_all makes the gradient
the exact per-token mean over every token of every rank. With gradient accumulation the denominators are
summed over the whole accumulation window before the first backward (all its micro-batches are already
loaded), so a step's gradient is the per-token mean over the window; BAGEL instead averaged per-micro-step
means (loss / accumulation steps), which weighs tokens of short packs more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@dataclass
class Denominators:
    ce: float   # Σ_all N_ce, or Σ_all w_i with ce_loss_reweighting
    mse: float  # Σ_all N_mse


def local_ce_denominator(batch, reweighting: bool) -> float:
    if batch.ce_loss_indexes is None or batch.num_ce_tokens == 0:
        return 0.0
    if reweighting:
        if batch.ce_loss_weights is None:
            raise ValueError("ce_loss_reweighting is on but the batch has no ce_loss_weights")
        return float(batch.ce_loss_weights.double().sum())
    return float(batch.num_ce_tokens)


def global_denominators(batches: Sequence, reweighting: bool, device: torch.device | str = "cpu") -> Denominators:
    """One all-reduce for the whole accumulation window."""
    t = torch.tensor([sum(local_ce_denominator(b, reweighting) for b in batches),
                      float(sum(b.num_mse_tokens for b in batches))], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return Denominators(ce=float(t[0]), mse=float(t[1]))


@dataclass
class LossParts:
    loss: torch.Tensor          # what backward() sees on this rank
    ce_sum: float               # Σ_local (w·)ce, detached, for logging
    mse_sum: float              # Σ_local mean_c(mse), detached


def compute_loss(ce: Optional[torch.Tensor], mse: Optional[torch.Tensor], batch, denom: Denominators, *,
                 ce_weight: float, mse_weight: float, reweighting: bool, visual_gen: bool,
                 world: Optional[int] = None) -> LossParts:
    """loss = ce_weight·W·Σ_local(w·ce)/Σ_all(w) + mse_weight·W·Σ_local mean_c(mse)/Σ_all N_mse.

    A missing CE counts as 0; MSE counts as 0 when visual_gen is off (docs/upstream-compat.md#loss-normalisation). Zero-weight terms still
    join the graph (·0) so DDP sees every head used by this micro-batch."""
    W = world_size() if world is None else world
    loss: torch.Tensor | None = None
    ce_sum = mse_sum = 0.0
    if ce is not None and ce.numel() > 0 and denom.ce > 0:
        ce = ce.float()
        if reweighting:
            w = batch.ce_loss_weights.to(ce.device, torch.float32)
            local = (ce * w).sum()
        else:
            local = ce.sum()
        ce_sum = float(local.detach())
        loss = ce_weight * W * local / denom.ce
    if mse is not None and mse.numel() > 0:
        per_token = mse.float().mean(dim=-1)
        local = per_token.sum()
        mse_sum = float(local.detach())
        term = (mse_weight * W * local / denom.mse) if (visual_gen and denom.mse > 0) else local * 0.0
        loss = term if loss is None else loss + term
    if loss is None:
        # nothing to learn from this micro-batch on this rank: a zero loss that still runs backward
        ref = ce if ce is not None else mse
        loss = ref.float().sum() * 0.0 if ref is not None else torch.zeros((), requires_grad=True)
    return LossParts(loss=loss, ce_sum=ce_sum, mse_sum=mse_sum)
