"""Checkpoint I/O: bit-identical round trip, clear errors naming missing/unexpected/mismatched keys,
upstream conventions (module. prefixes, sin-cos tables dropped, conv patch embedding), checkpoint
directories (inference files, untruncated ViT count, VAE file, component files), tokenizer resize rule."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from datasets_catalog.tokenizer import TextTokenizer
from model.checkpoint import (
    CheckpointError, checkpoint_state_dict, load_model_from_dir, load_vae_weights, load_weights,
    save_component_files, save_weights, write_inference_files,
)
from model.config import ConfigError, ModelConfig
from model.freeze import apply_freeze
from model.unified import UnifiedModel
from tests.unit.model.test_model_batches import single_thread, edit_sample, make_batch, vqa_sample

TOK = TextTokenizer.builtin()


def tiny(seed: int, vocab_size: int = TOK.vocab_size, **kw) -> UnifiedModel:
    torch.manual_seed(seed)
    return UnifiedModel(ModelConfig.tiny(vocab_size=vocab_size, **kw))


def _outputs(m, seed=0):
    b = make_batch([vqa_sample(0), edit_sample(1)])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = m.vae_model.encode(b.padded_images, generator=g)
        return m(b, lat, noise=torch.randn(b.packed_vae_token_indexes.numel(), 64, generator=g))


def _write_dir(m, path, ema=True):
    save_weights(m, path / ("ema.safetensors" if ema else "model.safetensors"))
    save_weights(m.vae_model.state_dict(), path / "ae.safetensors")
    write_inference_files(path, m.config, TOK, {"freeze_vae": True, "lr": 1e-5})


def test_save_load_round_trip_is_bit_identical(tmp_path):
    a, b = tiny(0), tiny(1)
    assert not torch.equal(a.connector.fc1.weight, b.connector.fc1.weight)
    save_weights(a, tmp_path / "model.safetensors", include_vae=True)
    report = load_weights(b, tmp_path / "model.safetensors")
    assert report.ok and report.loaded == len(a.state_dict()) - 2  # the two sin-cos tables are rebuilt
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    oa, ob = _outputs(a), _outputs(b)
    assert torch.equal(oa.ce, ob.ce) and torch.equal(oa.mse, ob.mse)


def test_frozen_vae_is_kept_out_of_model_weights_and_loaded_from_ae(tmp_path):
    m = tiny(0)
    apply_freeze(m, freeze_vae=True)
    assert not any(k.startswith("vae_model.") for k in checkpoint_state_dict(m))
    apply_freeze(m, freeze_vae=False)  # flags only freeze; a fresh model trains its VAE
    m2 = tiny(0)
    for p in m2.vae_model.parameters():
        p.requires_grad_(True)
    assert any(k.startswith("vae_model.") for k in checkpoint_state_dict(m2))
    save_weights(m.vae_model.state_dict(), tmp_path / "ae.safetensors")
    other = tiny(3)
    assert load_vae_weights(other.vae_model, tmp_path / "ae.safetensors").ok
    assert torch.equal(other.vae_model.decoder.conv_out.weight, m.vae_model.decoder.conv_out.weight)


def test_missing_key_fails_naming_it_unless_non_strict(tmp_path):
    m = tiny(0)
    state = checkpoint_state_dict(m)
    missing = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    del state[missing]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    other = tiny(1)
    with pytest.raises(CheckpointError) as err:
        load_weights(other, tmp_path / "w.safetensors")
    msg = str(err.value)
    assert missing in msg and "1 missing key" in msg and "w.safetensors" in msg
    before = other.language_model.model.layers[1].mlp_moe_gen.up_proj.weight.clone()
    report = load_weights(other, tmp_path / "w.safetensors", strict=False)
    assert report.missing == [missing]
    assert torch.equal(other.language_model.model.layers[1].mlp_moe_gen.up_proj.weight, before)
    assert torch.equal(other.connector.fc2.weight, m.connector.fc2.weight)


def test_unexpected_and_mismatched_keys_are_named():
    m = tiny(0)
    state = checkpoint_state_dict(m)
    state["vae_batch_norm.weight"] = torch.ones(3)
    state["llm2vae.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(1), state)
    assert "vae_batch_norm.weight" in str(err.value) and "llm2vae.bias: file (5,) vs model (64,)" in str(err.value)


def test_upstream_conventions_module_prefix_sincos_tables_and_conv_patch_embedding():
    m = tiny(0)
    state = checkpoint_state_dict(m)
    conv = torch.randn(64, 3, 14, 14)
    up = {}
    for k, v in state.items():
        key = k if k.startswith("vit_model") else f"module.{k}"
        up[key] = v
    up["vit_model.vision_model.embeddings.patch_embedding.weight"] = conv
    up["module.latent_pos_embed.pos_embed"] = torch.zeros(7, 7)  # other max size: dropped, rebuilt
    other = tiny(1)
    assert load_weights(other, up).ok
    lin = other.vit_model.vision_model.embeddings.patch_embedding.weight
    assert lin.shape == (64, 588)
    # column order (row, col, channel) matches patchify: linear on a patch == conv on that patch
    patch = torch.randn(3, 14, 14)
    conv_out = torch.nn.functional.conv2d(patch[None], conv)[0, :, 0, 0]
    lin_out = lin @ patch.permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(conv_out, lin_out, rtol=1e-4, atol=1e-4)
    assert torch.equal(other.latent_pos_embed.pos_embed, m.latent_pos_embed.pos_embed)
    assert not other.latent_pos_embed.pos_embed.requires_grad


def test_checkpoint_dir_round_trip_and_untruncated_vit_count(tmp_path):
    m = tiny(0)
    _write_dir(m, tmp_path)
    vit_cfg = json.loads((tmp_path / "vit_config.json").read_text())
    assert vit_cfg["num_hidden_layers"] == 3 and len(m.vit_model.vision_model.encoder.layers) == 2
    assert vit_cfg["medloom_vit_truncation"]["num_layers_used"] == 2
    assert json.loads((tmp_path / "training_args.json").read_text())["lr"] == 1e-5
    assert TextTokenizer.from_dir(tmp_path).special == TOK.special
    loaded = load_model_from_dir(tmp_path)
    assert len(loaded.vit_model.vision_model.encoder.layers) == 2  # reloading never drops a second layer
    for (k, va), vb in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(_outputs(m).ce, _outputs(loaded).ce)
    # write -> load -> write again keeps the count
    again = tmp_path / "again"
    write_inference_files(again, loaded.config, TOK)
    assert json.loads((again / "vit_config.json").read_text())["num_hidden_layers"] == 3


def test_ema_preferred_model_fallback_and_spec_overrides(tmp_path):
    m, e = tiny(0), tiny(1)
    _write_dir(m, tmp_path, ema=False)
    save_weights(e, tmp_path / "ema.safetensors")
    cfg = json.loads((tmp_path / "llm_config.json").read_text())
    cfg.update(qk_norm=False, tie_word_embeddings=True, layer_module="Qwen2DecoderLayer")
    (tmp_path / "llm_config.json").write_text(json.dumps(cfg))
    from_ema = load_model_from_dir(tmp_path)  # docs/upstream-compat.md#checkpoint-loading overrides: qk_norm on, untied, MoT
    assert from_ema.config.layer_module == "Qwen2MoTDecoderLayer" and from_ema.config.qk_norm
    assert torch.equal(from_ema.connector.fc1.weight, e.connector.fc1.weight)
    from_model = load_model_from_dir(tmp_path, use_ema=False)
    assert torch.equal(from_model.connector.fc1.weight, m.connector.fc1.weight)
    (tmp_path / "ema.safetensors").unlink()
    assert torch.equal(load_model_from_dir(tmp_path).connector.fc1.weight, m.connector.fc1.weight)


def test_umv_double_truncated_vit_config_is_detected(tmp_path):
    m = tiny(0)
    _write_dir(m, tmp_path)
    vit = json.loads((tmp_path / "vit_config.json").read_text())
    vit.pop("medloom_vit_truncation")
    vit["num_hidden_layers"] = 2  # what UniMedVL writes: the already truncated count
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model_from_dir(tmp_path)
    assert any("double-truncation" in str(w.message) for w in caught)
    assert len(loaded.vit_model.vision_model.encoder.layers) == 2


def test_component_files_and_missing_pieces(tmp_path):
    m = tiny(0)
    apply_freeze(m)  # default: VAE frozen, so no vae_model component
    save_component_files(m, tmp_path)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"] == {
        "language_model": "language_model.safetensors", "vit_model": "vit_model.safetensors"}
    lm = load_file(str(tmp_path / "language_model.safetensors"))
    assert "model.embed_tokens.weight" in lm  # component prefix stripped
    write_inference_files(tmp_path, m.config, TOK)
    with pytest.raises(CheckpointError, match="connector.fc1.weight"):
        load_model_from_dir(tmp_path)  # the component files hold no connector/heads: named, not silent
    empty = tmp_path / "empty"
    write_inference_files(empty, m.config, TOK)
    with pytest.raises(CheckpointError, match="ema.safetensors or model.safetensors"):
        load_model_from_dir(empty)
    save_weights(m, empty / "model.safetensors")
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        load_model_from_dir(empty)
    assert not hasattr(load_model_from_dir(empty, visual_gen=False), "vae_model")
    with pytest.raises(ConfigError, match="llm_config.json"):
        load_model_from_dir(tmp_path / "nowhere")


def test_embeddings_resized_only_when_tokens_were_added():
    m = tiny(0)
    assert not m.adapt_to_tokenizer(TOK)  # builtin: the special tokens exist, nothing added
    assert m.language_model.model.embed_tokens.weight.shape[0] == TOK.vocab_size

    class Added:
        num_added_tokens = 2
        vocab_size = TOK.vocab_size + 2

    old = m.language_model.lm_head.weight.clone()
    assert m.adapt_to_tokenizer(Added())
    assert m.language_model.lm_head.weight.shape[0] == TOK.vocab_size + 2
    assert torch.equal(m.language_model.lm_head.weight[: TOK.vocab_size], old)
    assert m.config.llm.vocab_size == TOK.vocab_size + 2


def test_bad_layer_module_is_refused():
    with pytest.raises(ConfigError, match="Qwen2MoTDecoderLayer_with_hidden_outputs"):
        ModelConfig.tiny(layer_module="Qwen2MoTDecoderLayer_with_hidden_outputs")


def test_from_checkpoint_dir_reads_transformers_written_configs(tmp_path):
    """An upstream-style directory: HF Qwen2 / SigLIP config dicts, no medloom config.json."""
    transformers = pytest.importorskip("transformers")
    llm = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                   tie_word_embeddings=True).to_dict()
    vit = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                          num_attention_heads=2, image_size=980, patch_size=14).to_dict()
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    cfg = ModelConfig.from_checkpoint_dir(tmp_path)
    assert (cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.num_key_value_heads) == (300, 64, 2)
    assert cfg.llm.rope_theta == 5000.0
    assert cfg.qk_norm and not cfg.tie_word_embeddings and cfg.layer_module == "Qwen2MoTDecoderLayer"
    assert cfg.vit.num_hidden_layers == 4 and cfg.vit.num_layers_used == 3 and not cfg.vit.rope
    assert (cfg.max_latent_size, cfg.latent_patch_size, cfg.vit_max_num_patch_per_side) == (64, 2, 70)
    assert cfg.vae.z_channels == 16 and cfg.vae.scale_factor == 0.3611
    assert ModelConfig.from_checkpoint_dir(tmp_path, visual_gen=False, max_latent_size=32).max_latent_size == 32
    llm["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_checkpoint_dir(tmp_path)
    (tmp_path / "llm_config.json").write_text("{\n  \"vocab_size\": 3,\n  oops\n}")
    with pytest.raises(ConfigError, match="llm_config.json: line 3"):
        ModelConfig.from_checkpoint_dir(tmp_path)


def test_qwen2_style_tokenizer_without_specials_grows_embeddings_on_load(tmp_path):
    """A transformers tokenizer lacking the four special tokens: they are added, and only then resized."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    m = tiny(0, vocab_size=256)
    save_weights(m, tmp_path / "ema.safetensors")
    save_weights(m.vae_model.state_dict(), tmp_path / "ae.safetensors")
    write_inference_files(tmp_path, m.config, None)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(tmp_path))
    loaded = load_model_from_dir(tmp_path)
    emb = loaded.language_model.model.embed_tokens.weight
    assert emb.shape[0] == 260 and loaded.config.llm.vocab_size == 260
    assert torch.equal(emb[:256], m.language_model.model.embed_tokens.weight)
    # saved again with the specials present: nothing is added, no resize
    tok = TextTokenizer.from_dir(tmp_path)
    again = tmp_path / "again"
    save_weights(loaded, again / "ema.safetensors")
    save_weights(loaded.vae_model.state_dict(), again / "ae.safetensors")
    write_inference_files(again, loaded.config, tok)
    assert TextTokenizer.from_dir(again).num_added_tokens == 0
    assert load_model_from_dir(again).language_model.lm_head.weight.shape[0] == 260
