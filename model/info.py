"""Parameter inventory of a model layout (jobs/model_info.py): built on the meta device, so the 7B layout
costs no memory."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .checkpoint import checkpoint_state_dict
from .config import ModelConfig
from .freeze import apply_freeze, is_und_expert_param
from .unified import UnifiedModel


def parameter_table(config: ModelConfig, freeze_llm: bool = False, freeze_vit: bool = False,
                    freeze_vae: bool = True, freeze_und: bool = False) -> dict[str, Any]:
    """{"parameters": [{"name", "shape", "trainable"}], "total": N} over the state-dict names a checkpoint
    would hold (the VAE only while it is trained), plus per-component sums under "components"."""
    with torch.device("meta"):
        model = UnifiedModel(config)
    apply_freeze(model, freeze_llm=freeze_llm, freeze_vit=freeze_vit, freeze_vae=freeze_vae, freeze_und=freeze_und)
    params = dict(model.named_parameters())
    rows = []
    for name, tensor in checkpoint_state_dict(model, include_vae=not freeze_vae).items():
        p = params.get(name)
        trainable = bool(p is not None and p.requires_grad and not (freeze_und and is_und_expert_param(name)))
        rows.append({"name": name, "shape": list(tensor.shape), "trainable": trainable})
    components: dict[str, dict[str, int]] = OrderedDict()
    for row in rows:
        comp = row["name"].split(".")[0]
        n = 1
        for d in row["shape"]:
            n *= d
        entry = components.setdefault(comp, {"parameters": 0, "trainable": 0})
        entry["parameters"] += n
        entry["trainable"] += n if row["trainable"] else 0
    total = sum(c["parameters"] for c in components.values())
    return {"parameters": rows, "total": total, "components": components}
