"""LoRA end to end through the real jobs in subprocesses: a tiny base trained from scratch, a LoRA run on it,
`jobs/export.py` merging the EMA adapter, and `jobs/vqa.py --greedy` answering identically from the adapter
checkpoint (base loaded, adapter applied) and from the merged directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.shard_factory import write_mixture
from trainer.config import load_config, validate
from trainer.data import generation_groups
from trainer.loop import train_loop

ROOT = Path(__file__).resolve().parents[3]
IMAGE = ROOT / "examples/radiology/images/ct/ct_small_soft_tissue.png"
VIT = ["--vit_transform", "56,28,14,3136"]


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


def _run(job: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)


def test_export_and_vqa_from_adapter_and_merged(tmp_path):
    mix = write_mixture(tmp_path / "data")
    base = Path(train_loop(_cfg(mix, tmp_path / "base", "--total_steps", "2", "--warmup_steps", "1",
                                "--dataloader_workers", "0"), print_fn=lambda s: None).checkpoints[-1])
    lora_mix = mix.with_name("lora_mix.yaml")
    lora_mix.write_text(mix.read_text().replace("  model: tiny\n", "").replace("  from_scratch: true\n", ""))
    run = train_loop(_cfg(lora_mix, tmp_path / "lora", "--model_path", str(base), "--finetuning_type", "lora",
                          "--total_steps", "4", "--warmup_steps", "1", "--lr", "1e-2", "--ema", "0.5",
                          "--dataloader_workers", "0"), print_fn=lambda s: None)
    ckpt = Path(run.checkpoints[-1])

    r = _run("export.py", "--model_path", ckpt, "--out", tmp_path / "merged", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["adapter_weights"] == "ema_adapter_model.safetensors" and Path(info["out"]).is_dir()

    prompt = "Which imaging modality and plane is shown?"
    answers = []
    for model_path in (ckpt, tmp_path / "merged", base):
        r = _run("vqa.py", "--model_path", model_path, "--image", IMAGE, "--prompt", prompt, "--greedy",
                 "--max_new_tokens", "24", *VIT)
        assert r.returncode == 0, r.stderr
        answers.append(r.stdout)
    assert answers[0] == answers[1]
    assert answers[0].strip()

    # user mistakes: one error line, exit 2
    r = _run("export.py", "--model_path", base, "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not an adapter checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run("export.py", "--model_path", ckpt, "--out", tmp_path / "merged")
    assert r.returncode == 2 and "not empty" in r.stderr
