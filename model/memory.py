"""Memory planner: trainable parameters and an estimate of peak memory per GPU for a training run, from the
model built on the meta device (no memory, seconds even at 7B). The formula is written out in
docs/training.md#memory-planner; it follows what the trainer does (FSDP2, fp32 master weights, bf16
compute, AdamW, EMA), so it is an estimate of this trainer's footprint, not of other frameworks'.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .adapters import LoraSettings, lora_config
from .config import ModelConfig
from .freeze import apply_freeze
from .unified import UnifiedModel

GIB = 1024 ** 3
OVERHEAD_BYTES = 2 * GIB      # CUDA context, NCCL buffers, allocator fragmentation (a flat allowance)
GATHERED_LAYERS = 2           # FSDP2 holds the current and the prefetched layer unsharded in bf16


@dataclass
class MemoryPlan:
    finetuning_type: str
    num_gpus: int
    expected_num_tokens: int
    total_parameters: int
    trainable_parameters: int
    weights_gib: float            # fp32 master weights, sharded, + bf16 gathered layers
    gradients_gib: float          # fp32, trainable only, sharded
    optimizer_gib: float          # AdamW exp_avg + exp_avg_sq, fp32, trainable only, sharded
    ema_gib: float                # fp32 EMA: the whole model (full/freeze) or the adapters (lora), sharded
    activations_gib: float        # without activation checkpointing
    activations_ckpt_gib: float   # with activation checkpointing
    logits_gib: float             # CE logits of the answer tokens (ce_fraction of the pack)
    overhead_gib: float
    peak_gib: float               # without activation checkpointing
    peak_ckpt_gib: float          # with activation checkpointing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(config: ModelConfig, finetuning_type: str = "full", lora: Optional[LoraSettings] = None,
                     freeze_vit: bool = False, freeze_vae: bool = True) -> tuple[int, int, int]:
    """(total, trainable, outside the decoder layers) of the model built on the meta device, with the
    adapters injected under lora."""
    with torch.device("meta"):
        model = UnifiedModel(config)
    apply_freeze(model, freeze_llm=finetuning_type == "freeze", freeze_vit=freeze_vit, freeze_vae=freeze_vae)
    if finetuning_type == "lora":
        from peft import inject_adapter_in_model

        cfg = lora_config(model, lora or LoraSettings())
        for p in model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(cfg, model, low_cpu_mem_usage=True)   # adapters on meta too
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = sum(p.numel() for p in model.language_model.model.layers.parameters())
    return total, trainable, total - layers


def activation_bytes_per_token_layer(config: ModelConfig) -> int:
    """bf16 tensors one decoder layer keeps for backward, per token: layer input, normed input, q, k, v,
    rotated q and k, attention output, residual, second normed input (7 x hidden + 3 x kv width) and the
    MLP's gate, up, silu(gate) and product (4 x intermediate). Every token runs through one expert."""
    llm = config.llm
    kv = llm.num_key_value_heads * llm.head_dim
    return 2 * (7 * llm.hidden_size + 3 * kv + 4 * llm.intermediate_size)


def plan_memory(config: ModelConfig, *, finetuning_type: str = "full", lora: Optional[LoraSettings] = None,
                num_gpus: int = 1, expected_num_tokens: int = 32768, ce_fraction: float = 0.25,
                freeze_vit: bool = False, freeze_vae: bool = True,
                counts: Optional[tuple[int, int, int]] = None) -> MemoryPlan:
    """Peak memory per GPU under FSDP2 full sharding over num_gpus (formula: docs/training.md#memory-planner).
    `counts` (from count_parameters) skips rebuilding the meta model."""
    for name, value, ok in (("num_gpus", num_gpus, num_gpus >= 1),
                            ("expected_num_tokens", expected_num_tokens, expected_num_tokens >= 1),
                            ("ce_fraction", ce_fraction, 0 <= ce_fraction <= 1)):
        if not ok:
            raise ValueError(f"--{name} must be {'in [0, 1]' if name == 'ce_fraction' else '>= 1'}, got {value}")
    total, trainable, outside = counts or count_parameters(config, finetuning_type, lora, freeze_vit=freeze_vit,
                                                           freeze_vae=freeze_vae)
    llm = config.llm
    g, t = num_gpus, expected_num_tokens
    layer_params = (total - outside) / max(1, llm.num_hidden_layers)
    weights = 4 * total / g + GATHERED_LAYERS * 2 * layer_params
    grads = 4 * trainable / g
    optim = 8 * trainable / g
    ema = 4 * (trainable if finetuning_type == "lora" else total) / g
    per_layer = activation_bytes_per_token_layer(config) * t
    acts = llm.num_hidden_layers * per_layer
    acts_ckpt = llm.num_hidden_layers * 2 * llm.hidden_size * t + per_layer
    logits = 6 * llm.vocab_size * int(t * ce_fraction)     # bf16 matmul output + its fp32 copy for the CE
    fixed = weights + grads + optim + ema + logits + OVERHEAD_BYTES
    return MemoryPlan(finetuning_type=finetuning_type, num_gpus=g, expected_num_tokens=t, total_parameters=total,
                      trainable_parameters=trainable, weights_gib=weights / GIB, gradients_gib=grads / GIB,
                      optimizer_gib=optim / GIB, ema_gib=ema / GIB, activations_gib=acts / GIB,
                      activations_ckpt_gib=acts_ckpt / GIB, logits_gib=logits / GIB,
                      overhead_gib=OVERHEAD_BYTES / GIB, peak_gib=(fixed + acts) / GIB,
                      peak_ckpt_gib=(fixed + acts_ckpt) / GIB)


def format_plan(plan: MemoryPlan) -> str:
    rows = [("weights (fp32 shards + bf16 gathered layers)", plan.weights_gib),
            ("gradients (fp32, trainable)", plan.gradients_gib),
            ("AdamW states (fp32, trainable)", plan.optimizer_gib),
            ("EMA (fp32)", plan.ema_gib),
            ("CE logits", plan.logits_gib),
            ("CUDA context and allocator allowance", plan.overhead_gib),
            ("activations, no checkpointing", plan.activations_gib),
            ("activations, activation checkpointing", plan.activations_ckpt_gib)]
    lines = [f"memory per GPU: finetuning_type {plan.finetuning_type}, {plan.num_gpus} GPU(s) (FSDP2 full shard), "
             f"{plan.expected_num_tokens:,} tokens per pack",
             f"trainable parameters: {plan.trainable_parameters:,} of {plan.total_parameters:,} "
             f"({100 * plan.trainable_parameters / max(1, plan.total_parameters):.2f}%)", ""]
    lines += [f"  {name:<44} {gib:>9.1f} GiB" for name, gib in rows]
    lines += ["", f"  {'peak, activation checkpointing':<44} {plan.peak_ckpt_gib:>9.1f} GiB",
              f"  {'peak, no activation checkpointing':<44} {plan.peak_gib:>9.1f} GiB"]
    return "\n".join(lines)


def fitting_suggestions(config: ModelConfig, gpu_gib: float, *, finetuning_type: str, lora: Optional[LoraSettings],
                        num_gpus: int, expected_num_tokens: int, freeze_vit: bool = False,
                        freeze_vae: bool = True) -> list[str]:
    """Flag sets (as command-line text) whose estimate with activation checkpointing fits gpu_gib per GPU."""
    out = []
    kinds = [finetuning_type] + [k for k in ("lora",) if k != finetuning_type]
    for kind in kinds:
        counts = count_parameters(config, kind, lora, freeze_vit=freeze_vit, freeze_vae=freeze_vae)
        for gpus in sorted({num_gpus, 2 * num_gpus, 4 * num_gpus, 8 * num_gpus}):
            for tokens in (expected_num_tokens, expected_num_tokens // 2, expected_num_tokens // 4):
                if tokens < 1:
                    continue
                p = plan_memory(config, finetuning_type=kind, lora=lora, num_gpus=gpus, expected_num_tokens=tokens,
                                counts=counts)
                if p.peak_ckpt_gib <= gpu_gib:
                    out.append(f"--finetuning_type {kind} --num_workers {gpus} --expected_num_tokens {tokens} "
                               f"--activation_checkpointing True ({p.peak_ckpt_gib:.1f} GiB)")
                    break
            if len(out) >= 3:
                return out
    return out
