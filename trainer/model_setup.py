"""Model, tokenizer and packing settings from the training arguments (docs/upstream-compat.md#model-construction), and weight I/O.

Weight files go through `model.checkpoint` (the model issue's loader/saver), so a training checkpoint is
exactly what inference and fine-tuning load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipelines.packing.config import PackingConfig
from trainer.config import TrainConfig

if TYPE_CHECKING:   # torch is imported where a model is built: jobs/train.py's preflight runs without it
    import torch
    from torch import nn


def tokenizer_spec(cfg: TrainConfig) -> Optional[str]:
    """Where the tokenizer comes from: the checkpoint being fine-tuned/resumed, else the builtin one."""
    for d in (cfg.model.model_path, cfg.train.resume_from):
        if d and any((Path(d) / f).exists() for f in ("tokenizer.json", "vocab.json", "medloom_tokenizer.json")):
            return str(d)
    return None


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    m, t = cfg.model, cfg.train
    out: dict[str, Any] = {
        "layer_module": m.layer_module, "qk_norm": m.llm_qk_norm, "tie_word_embeddings": m.tie_word_embeddings,
        "freeze_und": t.freeze_und, "visual_gen": t.visual_gen, "visual_und": t.visual_und,
        "timestep_shift": t.timestep_shift, "connector_act": m.connector_act, "interpolate_pos": m.interpolate_pos,
        "vit_select_layer": m.vit_select_layer, "vit_rope": m.vit_rope,
    }
    for name in ("max_latent_size", "latent_patch_size", "vit_max_num_patch_per_side"):
        if getattr(m, name) is not None:
            out[name] = getattr(m, name)
    return out


def build_model_config(cfg: TrainConfig, vocab_size: int):
    from model.config import ModelConfig

    over = model_overrides(cfg)
    if cfg.model.model_path:
        mc = ModelConfig.from_checkpoint_dir(cfg.model.model_path, **over)
    elif cfg.model.model == "7b":
        mc = ModelConfig.unimedvl_7b(**over)
    else:
        mc = ModelConfig.tiny(vocab_size=vocab_size, **over)
    if cfg.model.vit_patch_size is not None:
        mc.vit.patch_size = cfg.model.vit_patch_size
    if cfg.train.use_flex:
        mc.attn_backend = "flex"     # packs are padded to max_num_tokens with split_lens/attn_modes only
    elif cfg.run.use_gpu:
        mc.attn_backend = "auto"     # flash-attn varlen when installed, else flex
    return mc


def packing_config(cfg: TrainConfig, mc) -> PackingConfig:
    """Packing follows the model's geometry. The three CFG dropouts always come from the arguments:
    upstream copied them only when visual_gen was on, silently using vit 0.4 otherwise (spec pitfall)."""
    d, m = cfg.data, cfg.model
    return PackingConfig(
        expected_num_tokens=d.expected_num_tokens, max_num_tokens=d.max_num_tokens,
        max_num_tokens_per_sample=d.max_num_tokens_per_sample, prefer_buffer_before=d.prefer_buffer_before,
        max_buffer_size=d.max_buffer_size, text_cond_dropout_prob=m.text_cond_dropout_prob,
        vit_cond_dropout_prob=m.vit_cond_dropout_prob, vae_cond_dropout_prob=m.vae_cond_dropout_prob,
        use_flex=cfg.train.use_flex, interpolate_pos=mc.interpolate_pos, vit_patch_size=mc.vit.patch_size,
        vit_max_num_patch_per_side=mc.vit_max_num_patch_per_side, latent_patch_size=mc.latent_patch_size,
        max_latent_size=mc.max_latent_size, build_nested_masks=not cfg.run.use_gpu,
    )


def apply_freeze_flags(model: nn.Module, cfg: TrainConfig) -> None:
    t = cfg.train
    from model.freeze import apply_freeze

    apply_freeze(model, freeze_llm=t.freeze_llm or t.finetuning_type == "freeze", freeze_vit=t.freeze_vit, freeze_vae=t.freeze_vae,
                 freeze_und=t.freeze_und)


@dataclass
class Built:
    model: nn.Module
    config: Any          # ModelConfig
    tokenizer: Any       # TextTokenizer


def build_model(cfg: TrainConfig) -> Built:
    """Construct (random init), adapt to the tokenizer, copy_init_moe. Weights are loaded separately."""
    from datasets_catalog.tokenizer import TextTokenizer
    from model.unified import UnifiedModel

    tok = TextTokenizer.load(tokenizer_spec(cfg))
    mc = build_model_config(cfg, tok.vocab_size)
    model = UnifiedModel(mc)
    model.adapt_to_tokenizer(tok)
    if cfg.train.copy_init_moe:
        model.init_moe()
    return Built(model, mc, tok)


# ---- weight files ------------------------------------------------------------------------------------
def load_weights_into(model: nn.Module, directory: Path, filename: str) -> tuple[list[str], list[str], int]:
    """Non-strict load of directory/filename through model.checkpoint (pos-embed tables dropped, DDP prefixes
    stripped). A VAE kept outside the weights file (frozen) comes from the directory's ae.safetensors or
    vae_model.safetensors, as UniMedVL loads it."""
    from model.checkpoint import VAE_FILES, load_vae_weights, load_weights, read_weights

    directory = Path(directory)
    state = read_weights(directory / filename)
    report = load_weights(model, state, strict=False)
    vae = getattr(model, "vae_model", None)
    if vae is not None and not any(k.startswith("vae_model.") for k in state):
        for name in VAE_FILES:
            if (directory / name).is_file():
                load_vae_weights(vae, directory / name, strict=False)
                break
    return list(report.missing) + list(report.mismatched), list(report.unexpected), int(report.loaded)


def split_vae(state: dict[str, torch.Tensor], freeze_vae: bool) -> tuple[dict, Optional[dict]]:
    """(weights for model/ema.safetensors, FLUX-named VAE weights for ae.safetensors or None).
    A frozen VAE lives in ae.safetensors only (UniMedVL layout); a trained one stays in the weights file."""
    if not freeze_vae:
        return state, None
    main = {k: v for k, v in state.items() if not k.startswith("vae_model.")}
    vae = {k[len("vae_model."):]: v for k, v in state.items() if k.startswith("vae_model.")}
    return main, (vae or None)


# ---- memory estimate -----------------------------------------------------------------------------------
def memory_plan_for(cfg: TrainConfig):
    """The memory planner's estimate (model/memory.py) for this run: its layout, finetuning type, LoRA
    settings, workers (GPUs) and expected_num_tokens, built on the meta device."""
    from datasets_catalog.tokenizer import TextTokenizer
    from model.memory import plan_memory
    from trainer.config import lora_settings

    t = cfg.train
    mc = build_model_config(cfg, TextTokenizer.load(tokenizer_spec(cfg)).vocab_size)
    return plan_memory(mc, finetuning_type=t.finetuning_type, lora=lora_settings(cfg),
                       num_gpus=cfg.run.num_workers,
                       expected_num_tokens=cfg.data.expected_num_tokens, freeze_vit=t.freeze_vit,
                       freeze_vae=t.freeze_vae)



def memory_line(cfg: TrainConfig, plan) -> str:
    ckpt = cfg.train.activation_checkpointing and cfg.run.use_gpu
    peak = plan.peak_ckpt_gib if ckpt else plan.peak_gib
    where = "per GPU" if cfg.run.use_gpu else "per GPU if this run used GPUs (--use_gpu True)"
    return (f"memory estimate {where}: {peak:.1f} GiB ({plan.finetuning_type}, {plan.num_gpus} GPU(s), "
            f"{plan.expected_num_tokens:,} tokens, activation checkpointing {'on' if ckpt else 'off'}); "
            f"trainable {plan.trainable_parameters:,} of {plan.total_parameters:,} parameters")


def memory_refusal(cfg: TrainConfig, plan, gpu_gib: float, gpu_name: str) -> Optional[str]:
    """None when the estimate fits gpu_gib per GPU, else the error text with flag sets that would fit."""
    from model.memory import fitting_suggestions
    from trainer.config import lora_settings

    t = cfg.train
    peak = plan.peak_ckpt_gib if t.activation_checkpointing else plan.peak_gib
    if peak <= gpu_gib or t.cpu_offload:
        return None
    mc = build_model_config(cfg, _vocab(cfg))
    fits = fitting_suggestions(mc, gpu_gib, finetuning_type=t.finetuning_type, lora=lora_settings(cfg),
                               num_gpus=plan.num_gpus, expected_num_tokens=plan.expected_num_tokens,
                               freeze_vit=t.freeze_vit, freeze_vae=t.freeze_vae)
    hint = ("; flags that would fit: " + "; ".join(fits)) if fits else "; no tried combination fits: more GPUs"
    return (f"the estimated peak memory per GPU ({peak:.1f} GiB) exceeds the {gpu_gib:.1f} GiB of this GPU "
            f"({gpu_name}){hint}; or pass --check_memory False to start anyway (docs/training.md#memory-planner)")


def _vocab(cfg: TrainConfig) -> int:
    from datasets_catalog.tokenizer import TextTokenizer

    return TextTokenizer.load(tokenizer_spec(cfg)).vocab_size


# CPU runs (DDP, fp32, no activation checkpointing): each Ray worker holds a full replica. Measured on the tiny
# preset over the shipped example (configs/radiology_sft.yaml transforms, one process, dataloader_workers 0):
# peak RSS 0.63 GiB at 2,048 tokens per pack and 1.12 GiB at 8,192, i.e. about 80 KiB per packed token, most
# of it outside the decoder layers the planner models (ViT and VAE encoders, the batch's pixels, logits).
CPU_PROCESS_BYTES = int(0.45 * 1024 ** 3)     # torch, Python and the code before any tensor (measured)
CPU_IMAGE_PATH_BYTES_PER_TOKEN = 72 * 1024    # per packed token, beyond the planner's decoder activations
CPU_LOADER_BYTES = int(0.5 * 1024 ** 3)       # one background loader process (measured 0.41 GiB at 8,192 tokens)


def cpu_memory_per_worker(cfg: TrainConfig, expected_num_tokens: Optional[int] = None) -> float:
    """Estimated peak bytes of one CPU Ray worker (its loader processes included): fp32 weights, gradients,
    AdamW and EMA of a full replica of the decoder (counted from the layout, no model is built: that takes
    seconds), fp32 decoder activations without checkpointing (the planner's per-token term,
    docs/training.md#memory-planner, doubled for fp32), fp32 logits, and the measured per-token allowance."""
    tokens = expected_num_tokens or cfg.data.expected_num_tokens
    mc = build_model_config(cfg, _vocab(cfg))
    llm = mc.llm
    q_out, kv_out = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    layer = 2 * llm.hidden_size * q_out + 2 * llm.hidden_size * kv_out + 3 * llm.hidden_size * llm.intermediate_size
    params = 2 * llm.num_hidden_layers * layer + 2 * llm.vocab_size * llm.hidden_size   # MoT: two experts per layer
    replica = 20 * params                                                                # fp32 weights, grads, AdamW, EMA
    # model/memory.py's activation_bytes_per_token_layer (bf16: 2 x (7 hidden + 3 kv + 4 intermediate)), in
    # fp32; written out here because importing model.memory imports torch (seconds) before the run is known good
    activations = llm.num_hidden_layers * 4 * (7 * llm.hidden_size + 3 * kv_out + 4 * llm.intermediate_size) * tokens
    logits = 8 * llm.vocab_size * (tokens // 4)        # fp32 logits and their gradient over the CE tokens
    return (CPU_PROCESS_BYTES + replica + activations + logits + CPU_IMAGE_PATH_BYTES_PER_TOKEN * tokens
            + cfg.data.dataloader_workers * CPU_LOADER_BYTES)


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else the physical memory."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_memory_refusal(cfg: TrainConfig, print_fn=print, available: Optional[int] = None) -> Optional[str]:
    """Print the CPU estimate (per worker and for all workers); when all workers exceed this machine's
    available memory, the refusal text with the train: values that fit (None otherwise)."""
    gib = 1024 ** 3
    per = cpu_memory_per_worker(cfg)
    n = cfg.run.num_workers
    have = available_memory_bytes() if available is None else available
    print_fn(f"memory estimate per CPU worker: {per / gib:.1f} GiB at {cfg.data.expected_num_tokens:,} tokens per "
             f"pack ({n} worker(s): {n * per / gib:.1f} GiB; {have / gib:.1f} GiB available on this machine)")
    if n * per <= have or not cfg.run.check_memory:
        return None
    fits = []
    tokens = cfg.data.expected_num_tokens
    while tokens > 512 and not fits:
        tokens //= 2
        if n * cpu_memory_per_worker(cfg, tokens) <= have:
            fits.append(f"train: {{expected_num_tokens: {tokens}, max_num_tokens: {tokens * 9 // 8}, "
                        f"max_num_tokens_per_sample: {min(tokens, cfg.data.max_num_tokens_per_sample)}, "
                        f"prefer_buffer_before: {tokens // 2}}}")
    if n > 1 and per <= have:
        fits.append(f"train: {{num_workers: {max(1, int(have // per))}}}")
    hint = ("; values that fit: " + " or ".join(fits)) if fits else "; no smaller pack fits: use a bigger machine"
    return (f"the estimated peak memory of {n} CPU worker(s) ({n * per / gib:.1f} GiB, {per / gib:.1f} GiB each at "
            f"{cfg.data.expected_num_tokens:,} tokens per pack) exceeds the {have / gib:.1f} GiB available on this "
            f"machine{hint} (in the config's train: section or as --flags); or pass --check_memory False to start "
            f"anyway (docs/training.md#memory-planner)")
