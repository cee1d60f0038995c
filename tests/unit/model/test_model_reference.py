"""Independent references: our decoder vs transformers' Qwen2ForCausalLM (and Qwen3 for per-head q/k
RMSNorm), our SigLIP NaViT vs transformers' SiglipVisionModel after the layer drop; docs/upstream-compat.md#state-dict-keys layout of the
released 7B model on the meta device."""
from __future__ import annotations

import pytest
import torch

from model.attention import PackedAttention, TokenLayout
from model.config import LLMConfig, ModelConfig, ViTConfig
from model.qwen2 import Qwen2ForCausalLM, TokenRoute
from model.siglip import SiglipVisionModel, conv_to_linear_patch_weight
from tests.unit.model.test_model_batches import single_thread, patchify

transformers = pytest.importorskip("transformers")


def _llm_cfg(layer_module: str, qk_norm: bool) -> LLMConfig:
    return LLMConfig(vocab_size=261, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                     layer_module=layer_module, qk_norm=qk_norm)


def _hf_model(qk_norm: bool):
    common = dict(vocab_size=261, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    if qk_norm:  # Qwen3 = Qwen2 + per-head q/k RMSNorm before RoPE; with attention_bias, q/k/v (and o) biases
        cfg = transformers.Qwen3Config(**common, head_dim=16, attention_bias=True, rope_theta=10000.0)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    model.eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for name, p in model.named_parameters():
            if "o_proj.bias" in name:
                p.zero_()  # Qwen2 has no o bias; Qwen3's optional one is zeroed to match
            elif name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def _load_from_hf(ours: Qwen2ForCausalLM, hf) -> None:
    hf_state = hf.state_dict()
    own = ours.state_dict()
    with torch.no_grad():
        for key, value in own.items():
            src = key.replace("_moe_gen", "")
            value.copy_(hf_state[src])
    assert all(k.replace("_moe_gen", "") in hf_state for k in own)


def _our_logits(ours, ids_per_sample: list[list[int]]) -> list[torch.Tensor]:
    ids = torch.tensor([i for s in ids_per_sample for i in s])
    pos = torch.cat([torch.arange(len(s)) for s in ids_per_sample])
    lens = [len(s) for s in ids_per_sample]
    layout = TokenLayout.build(sum(lens), lens, lens, ["causal"] * len(lens))
    attend = PackedAttention(layout, "sdpa")
    h = ours(ours.model.embed_tokens(ids), TokenRoute(), pos, attend)
    return list(ours.lm_head(h).split(lens))


@pytest.mark.parametrize("layer_module", ["Qwen2DecoderLayer", "Qwen2MoTDecoderLayer", "Qwen2MoEDecoderLayer"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_understanding_path_matches_transformers(layer_module, qk_norm):
    hf = _hf_model(qk_norm)
    ours = Qwen2ForCausalLM(_llm_cfg(layer_module, qk_norm))
    _load_from_hf(ours, hf)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 261, (n,), generator=g).tolist() for n in (9, 5, 12)]
    for train_mode in (True, False):  # training path and inference path give the same logits
        ours.train(train_mode)
        with torch.no_grad():
            packed = _our_logits(ours, samples)
            for ids, got in zip(samples, packed):
                ref = hf(torch.tensor([ids])).logits[0]
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_vision_encoder_matches_transformers_siglip_after_layer_drop():
    cfg = ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    image_size=112, patch_size=14)
    hf_cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=112, patch_size=14,
                                             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                             vision_use_head=False)
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    ours = SiglipVisionModel(cfg).eval()
    assert len(ours.vision_model.encoder.layers) == 2  # n + 1 + (-2)
    own = ours.state_dict()
    hf_state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    post_ln = hf.vision_model.post_layernorm if hasattr(hf, "vision_model") else hf.post_layernorm  # v4 / v5
    with torch.no_grad():
        for key, value in own.items():
            src = hf_state[key.removeprefix("vision_model.")]
            value.copy_(conv_to_linear_patch_weight(src) if key.endswith("patch_embedding.weight") else src)
    img = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1
    side = 112 // 14
    pos = torch.tensor([r * side + c for r in range(side) for c in range(side)])
    with torch.no_grad():
        out = hf(pixel_values=img[None], output_hidden_states=True)
        ref = post_ln(out.hidden_states[-2])[0]  # last layer dropped
        got = ours(patchify(img, 14), [side * side], pos)
        # two images packed (varlen): each equals its own run
        img2 = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
        ref2 = post_ln(hf(pixel_values=img2[None], output_hidden_states=True)
                                              .hidden_states[-2])[0]
        both = ours(torch.cat([patchify(img, 14), patchify(img2, 14)]), [side * side] * 2, torch.cat([pos, pos]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both, torch.cat([ref, ref2]), rtol=1e-4, atol=1e-4)


def expected_7b_layout() -> dict[str, tuple[int, ...]]:
    """docs/upstream-compat.md#state-dict-keys names with the docs/upstream-compat.md#model-components dims, written out independently of the model code."""
    H, I, V, L, kv, d = 3584, 18944, 152064, 28, 4 * 128, 128
    out: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            out.update({
                f"{p}self_attn.q_proj{s}.weight": (H, H), f"{p}self_attn.q_proj{s}.bias": (H,),
                f"{p}self_attn.k_proj{s}.weight": (kv, H), f"{p}self_attn.k_proj{s}.bias": (kv,),
                f"{p}self_attn.v_proj{s}.weight": (kv, H), f"{p}self_attn.v_proj{s}.bias": (kv,),
                f"{p}self_attn.o_proj{s}.weight": (H, H),
                f"{p}self_attn.q_norm{s}.weight": (d,), f"{p}self_attn.k_norm{s}.weight": (d,),
                f"{p}input_layernorm{s}.weight": (H,), f"{p}post_attention_layernorm{s}.weight": (H,),
            })
            mlp = "mlp" + s
            out.update({f"{p}{mlp}.gate_proj.weight": (I, H), f"{p}{mlp}.up_proj.weight": (I, H),
                        f"{p}{mlp}.down_proj.weight": (H, I)})
    out.update({"language_model.model.norm.weight": (H,), "language_model.model.norm_moe_gen.weight": (H,),
                "language_model.lm_head.weight": (V, H)})
    D, DI = 1152, 4304
    v = "vit_model.vision_model."
    out.update({f"{v}embeddings.patch_embedding.weight": (D, 588), f"{v}embeddings.patch_embedding.bias": (D,),
                f"{v}embeddings.position_embedding.weight": (4900, D),
                f"{v}post_layernorm.weight": (D,), f"{v}post_layernorm.bias": (D,)})
    for i in range(26):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({f"{p}self_attn.{proj}.weight": (D, D), f"{p}self_attn.{proj}.bias": (D,)})
        for ln in ("layer_norm1", "layer_norm2"):
            out.update({f"{p}{ln}.weight": (D,), f"{p}{ln}.bias": (D,)})
        out.update({f"{p}mlp.fc1.weight": (DI, D), f"{p}mlp.fc1.bias": (DI,), f"{p}mlp.fc2.weight": (D, DI),
                    f"{p}mlp.fc2.bias": (D,)})
    out.update({"connector.fc1.weight": (H, D), "connector.fc1.bias": (H,), "connector.fc2.weight": (H, H),
                "connector.fc2.bias": (H,), "vit_pos_embed.pos_embed": (4900, H),
                "vae2llm.weight": (H, 64), "vae2llm.bias": (H,), "llm2vae.weight": (64, H), "llm2vae.bias": (64,),
                "time_embedder.mlp.0.weight": (H, 256), "time_embedder.mlp.0.bias": (H,),
                "time_embedder.mlp.2.weight": (H, H), "time_embedder.mlp.2.bias": (H,),
                "latent_pos_embed.pos_embed": (64 * 64, H)})
    return out


def test_7b_meta_layout_matches_spec(capsys):
    from model.checkpoint import checkpoint_state_dict
    from model.unified import UnifiedModel

    with torch.device("meta"):
        model = UnifiedModel(ModelConfig.unimedvl_7b())
    state = checkpoint_state_dict(model, include_vae=False)
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = expected_7b_layout()
    assert sorted(set(got) ^ set(expected)) == []
    assert got == expected
    assert all(v.is_meta for v in state.values())
    total = sum(v.numel() for v in state.values())
    with capsys.disabled():
        print(f"\n7B layout (meta device): {len(state)} tensors, {total:,} parameters (without the VAE)")
    assert 14.0e9 < total < 14.8e9  # "about 14B parameters, 7B active"
