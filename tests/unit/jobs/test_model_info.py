"""jobs/model_info.py: meta-device parameter inventory, JSON form, freeze flags, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

import pytest

from jobs import model_info
from model.checkpoint import checkpoint_state_dict, write_inference_files
from model.config import ModelConfig
from model.unified import UnifiedModel
from tests.unit.model.test_model_batches import single_thread  # noqa: F401  (autouse fixture)


def test_json_lists_checkpoint_names_shapes_and_trainable(capsys):
    assert model_info.main(["--model", "tiny", "--json", "--freeze_vit", "True"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"parameters", "total"}
    torch.manual_seed(0)
    real = checkpoint_state_dict(UnifiedModel(ModelConfig.tiny()), include_vae=False)
    assert [p["name"] for p in data["parameters"]] == list(real)
    assert all(p["shape"] == list(real[p["name"]].shape) for p in data["parameters"])
    assert data["total"] == sum(v.numel() for v in real.values())
    trainable = {p["name"]: p["trainable"] for p in data["parameters"]}
    assert not trainable["vit_model.vision_model.post_layernorm.weight"]
    assert trainable["connector.fc1.weight"] and not trainable["vit_pos_embed.pos_embed"]


def test_freeze_und_and_trained_vae(capsys):
    model_info.main(["--json", "--freeze_und", "True", "--freeze_vae", "False"])
    rows = {p["name"]: p["trainable"] for p in json.loads(capsys.readouterr().out)["parameters"]}
    assert rows["vae_model.encoder.conv_in.weight"]  # a trained VAE is part of model.safetensors
    assert not rows["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert rows["language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"]
    assert rows["language_model.lm_head.weight"]


def test_7b_text_summary_and_model_path(tmp_path, capsys):
    assert model_info.main(["--model", "unimedvl-7b"]) == 0
    out = capsys.readouterr().out
    assert "14,607,260,128" in out and "language_model" in out
    torch.manual_seed(0)
    m = UnifiedModel(ModelConfig.tiny())
    write_inference_files(tmp_path, m.config)
    assert model_info.main(["--model_path", str(tmp_path), "--visual_gen", "False", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)["parameters"]]
    assert "llm2vae.weight" not in names and "connector.fc1.weight" in names


def test_cli_errors_exit_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "jobs/model_info.py", "--model_path", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "llm_config.json" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit) as exc:
        model_info.main(["--freeze_vit", "maybe"])
    assert exc.value.code == 2
