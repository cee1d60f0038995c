"""Learning-rate schedules (docs/upstream-compat.md#optimizer-and-schedule): constant-with-warmup and cosine-with-min-lr.

A tiny stateful scheduler (the step counter is its whole state) so `scheduler.pt` round-trips exactly and
per-group base LRs (llm_lr, vit_lr, ...) keep their ratios.
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_lr_rate: float = 0.0) -> float:
    """Multiplier of the base LR after `step` scheduler steps (step 0 = the first optimizer step).

    Same shape as transformers' schedules that upstream uses: warm-up is step / warmup_steps (so the very
    first step runs at LR 0 when warm-up is on), then constant, or cosine down to min_lr_rate at total_steps.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_rate + (1.0 - min_lr_rate) * cosine
    raise ValueError(f"unknown lr_scheduler {kind!r}")


class WarmupScheduler:
    """Sets every param group's lr = base_lr * lr_factor(step); `step()` advances after an optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int,
                 lr: float, min_lr: float = 0.0) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        # transformers' cosine_with_min_lr uses min_lr / the optimizer's default lr, applied to every group
        self.min_lr_rate = (min_lr / lr) if (kind == "cosine" and lr > 0) else 0.0
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.last_step = 0
        self._apply()

    def factor(self) -> float:
        return lr_factor(self.last_step, kind=self.kind, warmup_steps=self.warmup_steps,
                         total_steps=self.total_steps, min_lr_rate=self.min_lr_rate)

    def _apply(self) -> None:
        f = self.factor()
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "kind": self.kind, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "base_lrs": list(self.base_lrs), "min_lr_rate": self.min_lr_rate}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step; the schedule shape comes from the current arguments (a resumed run may extend it)."""
        self.last_step = int(state["last_step"])
        self._apply()
