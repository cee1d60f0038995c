"""AdamW with upstream's betas/eps and weight decay 0, grouped per component as UniMedVL (docs/upstream-compat.md#optimizer-and-schedule).

Groups: vae_model (vae_lr), vit_model (vit_lr), language_model (llm_lr), others (lr); a missing component
LR falls back to lr. Frozen parameters are left out; empty groups are dropped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

COMPONENTS = ("vae_model", "vit_model", "language_model")


def component_of(name: str) -> str:
    """The UMV parameter group of a parameter name (wrapper prefixes such as `module.` are ignored)."""
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS else "others"


def param_groups(model: nn.Module, *, lr: float, llm_lr: Optional[float] = None, vit_lr: Optional[float] = None,
                 vae_lr: Optional[float] = None) -> list[dict]:
    lrs = {"language_model": llm_lr, "vit_model": vit_lr, "vae_model": vae_lr, "others": None}
    buckets: dict[str, list] = {k: [] for k in ("vae_model", "vit_model", "language_model", "others")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[component_of(name)].append(p)
    return [{"params": ps, "lr": lrs[k] if lrs[k] is not None else lr, "name": k}
            for k, ps in buckets.items() if ps]


def build_optimizer(model: nn.Module, *, lr: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-15,
                    llm_lr: Optional[float] = None, vit_lr: Optional[float] = None,
                    vae_lr: Optional[float] = None) -> torch.optim.AdamW:
    groups = param_groups(model, lr=lr, llm_lr=llm_lr, vit_lr=vit_lr, vae_lr=vae_lr)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0)
