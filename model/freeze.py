"""Freeze options (docs/upstream-compat.md#freezing).

`freeze_llm`/`freeze_vit`/`freeze_vae` set requires_grad False on `language_model`, `vit_model` and
`vae_model`; `freeze_und` never touches requires_grad: it switches the activation detaches of the MoT layers
(docs/upstream-compat.md#forward-pass), so the understanding expert gets no gradient while generation tokens still attend to it.
The two sin-cos tables are always frozen.
"""
from __future__ import annotations

from torch import nn

COMPONENTS = {"freeze_llm": "language_model", "freeze_vit": "vit_model", "freeze_vae": "vae_model"}


def apply_freeze(model: nn.Module, freeze_llm: bool = False, freeze_vit: bool = False, freeze_vae: bool = True,
                 freeze_und: bool = False) -> dict[str, int]:
    """Apply the flags in place; returns {"trainable": n, "frozen": n} parameter counts.

    Unlike upstream no `.eval()` is called, so the training path stays active (docs/upstream-compat.md#forward-pass).
    """
    flags = {"freeze_llm": freeze_llm, "freeze_vit": freeze_vit, "freeze_vae": freeze_vae}
    for flag, attr in COMPONENTS.items():
        module = getattr(model, attr, None)
        if module is not None and flags[flag]:
            for p in module.parameters():
                p.requires_grad_(False)
    model.config.llm.freeze_und = bool(freeze_und)
    for name, p in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


_UND_LAYER_PARTS = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.",
                    "self_attn.q_norm.", "self_attn.k_norm.", "mlp.", "input_layernorm.",
                    "post_attention_layernorm.")


def is_und_expert_param(name: str) -> bool:
    """Parameters that get no gradient under `freeze_und` (the understanding expert and its inputs).

    lm_head still learns from CE, and the generation twins, vae2llm/llm2vae and the time embedder from MSE.
    """
    if name.startswith(("vit_model.", "connector.")):
        return True
    if not name.startswith("language_model.model.") or "_moe_gen" in name:
        return False
    if name.endswith(("embed_tokens.weight", "model.norm.weight")):
        return True
    return ".layers." in name and any(part in name for part in _UND_LAYER_PARTS)
