"""--finetuning_type lora in the training loop (in-process, world size 1, real tiny model, shards and stream):
exact resume (FSDP2 straight run vs stop + auto-resume unwrapped, with gradient accumulation), the adapter
checkpoint's files, the base-weights check on resume, and PEFT loading the checkpoint's adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.adapters import ADAPTER_CONFIG_FILE, ADAPTER_FILE, BASE_REF_FILE, EMA_ADAPTER_FILE, weights_sha256
from tests.helpers.shard_factory import write_mixture
from trainer.checkpoint import local as ck
from trainer.config import ConfigError, load_config, validate
from trainer.data import generation_groups
from trainer.loop import train_loop

QUIET = {"print_fn": lambda s: None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(a LoRA mixture config without `model: tiny`, a base checkpoint trained 2 steps from scratch)."""
    root = tmp_path_factory.mktemp("lora")
    mix = write_mixture(root / "data")
    base = train_loop(_cfg(mix, root / "base", "--total_steps", "2", "--dataloader_workers", "0",
                           "--warmup_steps", "1"), **QUIET)
    lora_mix = mix.with_name("lora_mix.yaml")
    lora_mix.write_text(mix.read_text().replace("  model: tiny\n", "").replace("  from_scratch: true\n", ""))
    return lora_mix, Path(base.checkpoints[-1])


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


def _lora(mix, base, storage, *extra):
    return _cfg(mix, storage, "--model_path", str(base), "--finetuning_type", "lora", "--lora_rank", "4",
                "--total_steps", "6", "--save_every", "3", "--gradient_accumulation_steps", "2", *extra)


def test_lora_exact_resume_and_adapter_checkpoint(setup, tmp_path):
    mix, base = setup
    straight = train_loop(_lora(mix, base, tmp_path / "a", "--parallelism", "fsdp", "--dataloader_workers", "1"),
                          **QUIET)
    first = train_loop(_lora(mix, base, tmp_path / "b", "--stop_at_step", "3", "--dataloader_workers", "0"), **QUIET)
    second = train_loop(_lora(mix, base, tmp_path / "b", "--dataloader_workers", "0"), **QUIET)
    assert second.start_step == 3 and second.resumed_from.endswith("0000003")
    key = [(h["step"], h["ce"], h["mse"], h["lr"]) for h in straight.history]
    assert key == [(h["step"], h["ce"], h["mse"], h["lr"]) for h in first.history + second.history]

    a, b = tmp_path / "a/lora_mix/checkpoints/0000006", tmp_path / "b/lora_mix/checkpoints/0000006"
    for name in (ADAPTER_FILE, EMA_ADAPTER_FILE):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    # adapters moved, the EMA lags; no full weights in a LoRA checkpoint
    w3, w6, e6 = (load_file(str(p)) for p in (a.parent / "0000003" / ADAPTER_FILE, a / ADAPTER_FILE,
                                               a / EMA_ADAPTER_FILE))
    assert any(not torch.equal(w3[k], w6[k]) for k in w6) and any(not torch.equal(e6[k], w6[k]) for k in w6)
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in w6)
    assert not (a / ck.MODEL_FILE).exists() and not (a / ck.EMA_FILE).exists()
    for f in (ADAPTER_CONFIG_FILE, BASE_REF_FILE, ck.optimizer_file(0, 1), ck.SCHEDULER_FILE,
              ck.stream_state_file(0, 1), "llm_config.json", ck.MARKER):
        assert (a / f).is_file(), f
    ref = json.loads((a / BASE_REF_FILE).read_text())
    assert ref["sha256"] == weights_sha256(base / ck.MODEL_FILE) and Path(ref["path"]) == base.resolve()


def test_peft_loads_the_checkpoint_adapter_and_base_is_checked(setup, tmp_path):
    from peft import PeftModel

    from model.checkpoint import load_model_from_dir

    mix, base = setup
    run = train_loop(_lora(mix, base, tmp_path / "r", "--total_steps", "3", "--dataloader_workers", "0"), **QUIET)
    ckpt = Path(run.checkpoints[-1])
    fresh = load_model_from_dir(base, use_ema=False)
    peft_model = PeftModel.from_pretrained(fresh, str(ckpt))
    saved = load_file(str(ckpt / ADAPTER_FILE))
    got = dict(peft_model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(got[name], value), key

    # resuming the run on other base weights is refused with one clear message
    other = tmp_path / "other_base"
    other.mkdir()
    for f in base.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    w = load_file(str(other / ck.MODEL_FILE))
    w[next(iter(w))].add_(1.0)
    from safetensors.torch import save_file

    save_file(w, str(other / ck.MODEL_FILE))
    cfg = _lora(mix, other, tmp_path / "r", "--total_steps", "6", "--dataloader_workers", "0")
    with pytest.raises(ck.ResumeError, match="pass the same base checkpoint"):
        train_loop(cfg, **QUIET)


def test_lora_config_errors(setup, tmp_path):
    mix, base = setup
    with pytest.raises(ConfigError, match="needs|adapts a base checkpoint"):
        _cfg(mix, tmp_path, "--model", "tiny", "--finetuning_type", "lora")
    with pytest.raises(ConfigError, match="lora_experts"):
        _cfg(mix, tmp_path, "--model_path", str(base), "--finetuning_type", "lora", "--lora_experts", "vit")
    with pytest.raises(ConfigError, match="finetuning_type"):
        _cfg(mix, tmp_path, "--model_path", str(base), "--finetuning_type", "qlora4")


def test_merged_export_forward_equals_the_adapted_model(setup, tmp_path):
    from model.adapters import AdapterError, export_merged, load_adapted_model
    from model.checkpoint import load_model_from_dir
    from tests.unit.model.test_model_batches import edit_sample, make_batch, vqa_sample
    from tests.unit.model.test_model_forward import noise_for

    mix, base = setup
    run = train_loop(_lora(mix, base, tmp_path / "r", "--total_steps", "3", "--dataloader_workers", "0",
                           "--lr", "1e-2", "--warmup_steps", "1"), **QUIET)
    ckpt = Path(run.checkpoints[-1])
    info = export_merged(ckpt, tmp_path / "merged")
    merged_dir = Path(info["out"])
    for f in ("model.safetensors", "ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json",
              "merged_from.json", "training_args.json"):
        assert (merged_dir / f).is_file(), f
    # the export is a released-layout directory that still defaults to the transforms the run trained at
    from model.inference.defaults import read_defaults

    recorded = json.loads((ckpt / "training_args.json").read_text())["inference"]["vit_transform"]
    assert read_defaults(merged_dir).vit_transform.max_image_size == recorded["max_image_size"]
    adapted = load_adapted_model(ckpt, merge=False).eval()   # base + EMA adapter, unmerged (peft layers)
    merged = load_model_from_dir(merged_dir).eval()
    assert any(".lora_A." in n for n, _ in adapted.named_parameters())
    batch = make_batch([vqa_sample(0), edit_sample(1)])
    outs = []
    for m in (adapted, merged):
        with torch.no_grad():
            lat = m.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
            outs.append(m(batch, lat, noise=noise_for(batch, m.config.latent_channels, 1)))
    torch.testing.assert_close(outs[1].ce, outs[0].ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].mse, outs[0].mse, rtol=1e-5, atol=1e-5)
    # the merge is not a no-op: the base alone differs
    plain = load_model_from_dir(base, use_ema=False).eval()
    with torch.no_grad():
        lat = plain.vae_model.encode(batch.padded_images, generator=torch.Generator().manual_seed(0))
        base_out = plain(batch, lat, noise=noise_for(batch, plain.config.latent_channels, 1))
    assert not torch.allclose(base_out.ce, outs[0].ce, atol=1e-6)
    with pytest.raises(AdapterError, match="not empty"):
        export_merged(ckpt, merged_dir)
    with pytest.raises(AdapterError, match="not an adapter checkpoint"):
        export_merged(base, tmp_path / "x")


def test_model_path_flag_replaces_the_configs_preset(setup, tmp_path):
    mix, base = setup
    preset_mix = mix.with_name("mix.yaml")   # the trainer tests' mixture, whose train: section says model: tiny
    cfg = _cfg(preset_mix, tmp_path, "--model_path", str(base), "--finetuning_type", "lora")
    assert cfg.model.model is None and cfg.model.model_path == str(base) and not cfg.train.from_scratch
    with pytest.raises(ConfigError, match="not both"):
        _cfg(preset_mix, tmp_path, "--model_path", str(base), "--model", "tiny")


def test_finetuning_type_freeze_freezes_the_language_model(setup, tmp_path):
    from model.config import ModelConfig
    from model.unified import UnifiedModel
    from trainer.model_setup import apply_freeze_flags

    mix, base = setup
    cfg = _cfg(mix, tmp_path, "--model_path", str(base), "--finetuning_type", "freeze")
    m = UnifiedModel(ModelConfig.tiny())
    apply_freeze_flags(m, cfg)
    assert not any(p.requires_grad for p in m.language_model.parameters())
    assert all(p.requires_grad for p in m.connector.parameters())
    assert any(p.requires_grad for p in m.vit_model.parameters())
