"""LoRA through peft on the tiny unified model (model/adapters.py): which parameters get gradients per
--lora_experts choice, memorising one packed batch with adapters only, PEFT-format files that
`peft.PeftModel.from_pretrained` loads onto a freshly built base, and merging (forward unchanged)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.adapters import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, AdapterError, LoraSettings, adapter_state,
                            inject_lora, load_adapter_state, lora_config, merge_adapters, read_adapter_config,
                            target_names, write_adapter_files)
from model.checkpoint import read_weights
from tests.unit.model.test_model_batches import edit_sample, make_batch, single_thread, vqa_sample  # noqa: F401
from tests.unit.model.test_model_forward import noise_for, tiny_model

LAYERS = 2            # ModelConfig.tiny
PER_EXPERT = 7        # q, k, v, o, gate, up, down per decoder layer and expert


def _adapted(seed: int = 4, **kw) -> torch.nn.Module:
    m = tiny_model(seed)
    with torch.no_grad():
        m.llm2vae.weight.normal_(0, 0.05)   # zero-init would block the MSE path into the generation expert
    inject_lora(m, lora_config(m, LoraSettings(**kw)))
    return m


def _loss(m, batch):
    with torch.no_grad():
        lat = m.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
    out = m(batch, lat, noise=noise_for(batch, m.config.latent_channels, 1))
    return out.ce.mean() + out.mse.mean(), out


@pytest.mark.parametrize("experts", ["und", "gen", "both"])
def test_only_adapters_get_gradients_per_expert_choice(experts):
    m = _adapted(experts=experts)
    with torch.no_grad():   # B starts at zero (no gradient into A at init): give it a value
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    names = target_names(tiny_model(0), LoraSettings(experts=experts))
    want_modules = {"und": LAYERS * PER_EXPERT, "gen": LAYERS * PER_EXPERT, "both": 2 * LAYERS * PER_EXPERT}
    assert len(names) == want_modules[experts]
    assert all(("_moe_gen" in n) == (experts == "gen") for n in names) or experts == "both"
    batch = make_batch([vqa_sample(0), edit_sample(1)])
    loss, _ = _loss(m, batch)
    loss.backward()
    for name, p in m.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter, name
        if not is_adapter:
            assert p.grad is None, name
            continue
        gen = "_moe_gen" in name
        assert experts == "both" or gen == (experts == "gen"), name
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the generation twins have adapters only with gen|both
    has_gen = any("_moe_gen" in n and ".lora_" in n for n, _ in m.named_parameters())
    assert has_gen == (experts in ("gen", "both"))


def test_vit_and_connectors_adapters_are_opt_in():
    m = _adapted(experts="und", vit=True, connectors=True, target="q_proj,v_proj")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in m.named_parameters() if ".lora_A." in n}
    assert {n for n in adapted if n.startswith("language_model.")} == {
        f"language_model.model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")}
    assert any(n.startswith("vit_model.vision_model.encoder.layers.") for n in adapted)
    assert {"connector.fc1", "connector.fc2", "vae2llm", "llm2vae"} <= adapted
    plain = _adapted()
    assert not any(n.startswith(("vit_model.", "connector.", "vae2llm", "llm2vae")) and ".lora_" in n
                   for n, _ in plain.named_parameters())


def test_lora_memorises_one_packed_batch(single_thread):
    m = _adapted(rank=8)
    with torch.no_grad():
        # the frozen head of a random tiny base (std 0.02, width 128) caps every logit near +-2.6 after the
        # final RMSNorm, so no adapter could push CE under 0.05; a trained base's head has a larger scale
        m.language_model.lm_head.weight.normal_(0, 0.1)
    base = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    batch = make_batch([vqa_sample(0), edit_sample(1)])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    ce = None
    for _ in range(300):
        opt.zero_grad(set_to_none=True)
        loss, out = _loss(m, batch)
        ce = float(out.ce.detach().mean())
        if ce < 0.05:
            break
        out.ce.mean().backward()
        opt.step()
    assert ce is not None and ce < 0.05, ce
    assert all(torch.equal(base[n], p) for n, p in m.named_parameters() if n in base)   # base untouched


def test_peft_loads_the_adapter_onto_a_fresh_base_and_merge_keeps_the_forward(tmp_path):
    from peft import PeftModel

    m = _adapted(seed=4, rank=4, experts="both")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    cfg = lora_config(tiny_model(0), LoraSettings(rank=4))
    files = write_adapter_files(tmp_path, cfg, adapter_state(m), None, {"path": "x", "weights_file": "m",
                                                                         "sha256": "0"})
    assert set(files) >= {ADAPTER_FILE, ADAPTER_CONFIG_FILE}
    saved = read_weights(tmp_path / ADAPTER_FILE)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)
    assert json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())["peft_type"] == "LORA"

    batch = make_batch([vqa_sample(0), edit_sample(1)])
    m.eval()
    with torch.no_grad():
        _, want = _loss(m, batch)
        fresh = tiny_model(4)   # same base weights, no adapters
        fresh.llm2vae.weight.copy_(m.llm2vae.weight)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        _, got = _loss(peft_model.base_model.model, batch)
    torch.testing.assert_close(got.ce, want.ce, rtol=0, atol=0)

    # our own loader reads the same files; merging folds the adapters into plain Linears
    again = tiny_model(4)
    with torch.no_grad():
        again.llm2vae.weight.copy_(m.llm2vae.weight)
    inject_lora(again, read_adapter_config(tmp_path))
    load_adapter_state(again, saved)
    merged = merge_adapters(again).eval()
    assert not any(".lora_" in k or ".base_layer." in k for k in merged.state_dict())
    with torch.no_grad():
        _, after = _loss(merged, batch)
    torch.testing.assert_close(after.ce, want.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.mse, want.mse, rtol=1e-5, atol=1e-5)


def test_adapter_state_must_match_the_layout():
    m = _adapted(rank=4)
    state = adapter_state(m)
    other = _adapted(rank=8)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_state(other, state)
    fewer = _adapted(rank=4, target="q_proj")
    with pytest.raises(AdapterError, match="unexpected"):
        load_adapter_state(fewer, state)


NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@settings(max_examples=10, deadline=None)
@given(st.sets(st.sampled_from(NAMES), min_size=1), st.sampled_from(["und", "gen", "both"]))
def test_target_selection_matches_the_hand_count(chosen, experts):
    m = tiny_model(0)
    names = target_names(m, LoraSettings(target=",".join(sorted(chosen)), experts=experts))
    per = 2 if experts == "both" else 1
    assert len(names) == LAYERS * len(chosen) * per
    assert {n.rsplit(".", 1)[-1].replace("_moe_gen", "") for n in names} == chosen


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(lambda s: s.strip() and s.strip() not in NAMES + ["all"]
                                                         and "," not in s))
def test_unknown_targets_and_bad_settings_are_refused(word):
    m = tiny_model(0)
    with pytest.raises(AdapterError, match="match no Linear"):
        target_names(m, LoraSettings(target=word))
    for bad in (LoraSettings(rank=0), LoraSettings(dropout=1.0), LoraSettings(experts="vit")):
        with pytest.raises(AdapterError):
            bad.check()
