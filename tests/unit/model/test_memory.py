"""The memory planner (model/memory.py, jobs/model_info.py): parameter counts of the 7B layout on the meta
device against hand counts from the layout's sizes, and how the estimate scales with GPUs and checkpointing."""
from __future__ import annotations

import json

import pytest

from jobs import model_info
from model.adapters import LoraSettings
from model.config import ModelConfig
from model.memory import activation_bytes_per_token_layer, count_parameters, plan_memory

# the released layout (docs/upstream-compat.md#model-components): hidden 3584, 4 KV heads of 128, MLP 18944,
# 28 MoT layers, each with an understanding and a generation twin of q, k, v, o, gate, up, down
H, KV, I, LAYERS = 3584, 4 * 128, 18944, 28


def lora_hand_count(rank: int, experts: int) -> int:
    """r x (in + out) per adapted Linear: q (H->H), k and v (H->KV), o (H->H), gate and up (H->I), down (I->H)."""
    per_expert = 2 * H + 2 * (H + KV) + 2 * H + 2 * (H + I) + (I + H)
    return LAYERS * experts * rank * per_expert


@pytest.fixture(scope="module")
def big() -> ModelConfig:
    return ModelConfig.unimedvl_7b()


def test_lora_parameter_counts_of_the_7b_layout(big):
    full_total, full_trainable, _ = count_parameters(big, "full")
    for rank, experts, n in ((16, "both", 2), (16, "und", 1), (8, "gen", 1)):
        total, trainable, _ = count_parameters(big, "lora", LoraSettings(rank=rank, experts=experts))
        assert trainable == lora_hand_count(rank, n)
        assert total == full_total + trainable     # the adapters are the only new parameters
    assert lora_hand_count(16, 2) == 80_740_352
    # full: everything but the frozen VAE and the two sin-cos tables
    assert full_total - full_trainable == _vae_and_tables(big)


def _vae_and_tables(config: ModelConfig) -> int:
    import torch

    from model.unified import UnifiedModel

    with torch.device("meta"):
        m = UnifiedModel(config)
    vae = sum(p.numel() for p in m.vae_model.parameters())
    return vae + m.vit_pos_embed.pos_embed.numel() + m.latent_pos_embed.pos_embed.numel()


def test_activation_bytes_by_hand(big):
    # bf16: 7 hidden-wide + 3 KV-wide + 4 MLP-wide tensors per token and layer
    assert activation_bytes_per_token_layer(big) == 2 * (7 * 3584 + 3 * 512 + 4 * 18944) == 204_800


def test_estimate_scales_with_gpus_and_checkpointing():
    tiny = ModelConfig.tiny()
    counts = count_parameters(tiny, "full")
    one = plan_memory(tiny, num_gpus=1, expected_num_tokens=4096, counts=counts)
    eight = plan_memory(tiny, num_gpus=8, expected_num_tokens=4096, counts=counts)
    for field in ("gradients_gib", "optimizer_gib", "ema_gib"):
        assert getattr(eight, field) == pytest.approx(getattr(one, field) / 8)
    assert eight.activations_gib == one.activations_gib and one.activations_ckpt_gib < one.activations_gib
    assert one.peak_ckpt_gib < one.peak_gib
    lora = plan_memory(tiny, finetuning_type="lora", num_gpus=1, expected_num_tokens=4096)
    assert lora.optimizer_gib < one.optimizer_gib and lora.ema_gib < one.ema_gib
    with pytest.raises(ValueError, match="--num_gpus must be >= 1"):
        plan_memory(tiny, num_gpus=0)


def test_model_info_planner_json_and_errors(capsys):
    assert model_info.main(["--model", "tiny", "--finetuning_type", "lora", "--lora_rank", "4", "--num_gpus", "2",
                            "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    mem = data["memory"]
    assert mem["finetuning_type"] == "lora" and mem["num_gpus"] == 2 and mem["expected_num_tokens"] == 32768
    tiny = ModelConfig.tiny(vocab_size=261)
    llm = tiny.llm
    kv = llm.num_key_value_heads * llm.head_dim
    per = (2 * llm.hidden_size + 2 * (llm.hidden_size + kv) + 2 * llm.hidden_size
           + 2 * (llm.hidden_size + llm.intermediate_size) + llm.intermediate_size + llm.hidden_size)
    assert mem["trainable_parameters"] == llm.num_hidden_layers * 2 * 4 * per
    assert model_info.main(["--model", "tiny", "--num_gpus", "0"]) == 2
    assert "--num_gpus must be >= 1" in capsys.readouterr().err
    assert model_info.main(["--model", "tiny", "--finetuning_type", "lora", "--lora_target", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: lora_target")
