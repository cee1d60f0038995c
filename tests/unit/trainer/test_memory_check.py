"""jobs/train.py's memory check (trainer/model_setup.py): the estimate line for the run, and the refusal of a
GPU run whose estimate exceeds the GPU, with flag sets that would fit (checked against the planner itself)."""
from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig
from model.memory import plan_memory
from trainer.config import load_config
from trainer.model_setup import memory_line, memory_plan_for, memory_refusal


def _cfg(tmp_path: Path, *extra: str):
    mix = tmp_path / "mix.yaml"
    mix.write_text("sft: {dataset_names: [x], weight: 1}\n")
    return load_config(["--config", str(mix), "--model", "7b", "--from_scratch", "True", "--use_gpu", "True",
                        "--expected_num_tokens", "32768", *extra])


def test_refuses_what_cannot_fit_and_names_flags_that_do(tmp_path):
    cfg = _cfg(tmp_path, "--num_workers", "1")
    plan = memory_plan_for(cfg)
    assert plan.num_gpus == 1 and plan.finetuning_type == "full" and plan.expected_num_tokens == 32768
    assert f"{plan.peak_ckpt_gib:.1f} GiB (full, 1 GPU(s)" in memory_line(cfg, plan)
    msg = memory_refusal(cfg, plan, 80.0, "an 80 GiB GPU")
    assert msg is not None and "exceeds the 80.0 GiB" in msg and "--check_memory False" in msg
    suggestions = msg.split("flags that would fit: ")[1].split("; or pass")[0].split("; ")
    assert suggestions
    big = ModelConfig.unimedvl_7b()
    for s in suggestions:   # each suggested flag set really fits by the planner's own estimate
        words = s.split()
        kind, gpus, tokens = words[1], int(words[3]), int(words[5])
        assert plan_memory(big, finetuning_type=kind, num_gpus=gpus, expected_num_tokens=tokens).peak_ckpt_gib <= 80
    assert memory_refusal(cfg, plan, 10_000.0, "a huge GPU") is None
