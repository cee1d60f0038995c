"""ModelConfig: presets, overrides, JSON round trips through a checkpoint directory (property-based)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checkpoint import write_inference_files
from model.config import ConfigError, LLMConfig, ModelConfig, ViTConfig


@settings(max_examples=30, deadline=None)
@given(heads=st.sampled_from([1, 2, 4, 8]), head_dim=st.sampled_from([4, 8, 16]), kv_div=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 40), vocab=st.integers(10, 200_000), theta=st.floats(100, 1e7),
       vit_layers=st.integers(2, 30), select=st.sampled_from([-1, -2]), latent=st.integers(1, 128),
       shift=st.floats(0.5, 5.0), gen=st.booleans())
def test_config_survives_a_checkpoint_directory(tmp_path_factory, heads, head_dim, kv_div, layers, vocab, theta,
                                                vit_layers, select, latent, shift, gen):
    kv = max(1, heads // kv_div)
    cfg = ModelConfig(
        llm=LLMConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=3 * head_dim,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta),
        vit=ViTConfig(num_hidden_layers=vit_layers, select_layer=select), max_latent_size=latent,
        timestep_shift=shift, visual_gen=gen)
    d = tmp_path_factory.mktemp("ck")
    write_inference_files(d, cfg)
    back = ModelConfig.from_checkpoint_dir(d)
    assert back.llm.to_json_dict() == cfg.llm.to_json_dict()
    assert back.vit.num_hidden_layers == vit_layers and back.vit.num_layers_used == vit_layers + 1 + select
    assert json.loads((d / "vit_config.json").read_text())["num_hidden_layers"] == vit_layers
    assert (back.max_latent_size, back.timestep_shift, back.visual_gen) == (latent, shift, gen)
    assert back.vae == cfg.vae


def test_presets_and_overrides():
    tiny = ModelConfig.tiny()
    assert tiny.llm.vocab_size == 261 and tiny.latent_channels == 64 and tiny.latent_downsample == 16
    assert tiny.vit.num_layers_used == 2 and tiny.layer_module == "Qwen2MoTDecoderLayer"
    big = ModelConfig.unimedvl_7b()
    assert (big.llm.hidden_size, big.llm.num_hidden_layers, big.vit.num_layers_used, big.max_latent_size) == (
        3584, 28, 26, 64)
    o = tiny.with_overrides(layer_module="Qwen2MoEDecoderLayer", freeze_und=True, vit_select_layer=-1, max_latent_size=8)
    assert o.layer_module == "Qwen2MoEDecoderLayer" and o.freeze_und and o.vit.num_layers_used == 3
    assert tiny.layer_module == "Qwen2MoTDecoderLayer" and not tiny.freeze_und  # copies, not aliases
    with pytest.raises(ConfigError, match="unknown model override 'lr'"):
        tiny.with_overrides(lr=1.0)
    with pytest.raises(ConfigError, match="attn_backend"):
        tiny.with_overrides(attn_backend="magic")
    with pytest.raises(ConfigError, match="ViT positions"):
        tiny.with_overrides(vit_max_num_patch_per_side=80)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LLMConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
