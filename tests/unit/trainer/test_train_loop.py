"""The training loop in-process (world size 1, no Ray): real tiny model, real shards, real mixture stream.

Exact resume, auto-resume over an incomplete checkpoint, checkpoints loadable by model.checkpoint, fine-tuning
from a checkpoint's EMA weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.shard_factory import write_mixture
from trainer.checkpoint import local as ck
from trainer.config import load_config, validate
from trainer.data import generation_groups
from trainer.loop import train_loop


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    return write_mixture(tmp_path_factory.mktemp("train_data"))


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_exact_resume_and_checkpoint_files(mixture, tmp_path):
    # N = 6 straight (FSDP2 wrapping on CPU/gloo, background loader process) ...
    straight = train_loop(_cfg(mixture, tmp_path / "a", "--total_steps", "6", "--save_every", "3",
                               "--dataloader_workers", "1", "--parallelism", "fsdp"), print_fn=lambda s: None)
    # ... vs 3, stop, resume to 6 (no wrapping, loader thread whose packs are built ahead by 2 threads):
    # same losses, bit-identical weights
    first = train_loop(_cfg(mixture, tmp_path / "b", "--total_steps", "6", "--save_every", "3",
                            "--stop_at_step", "3", "--dataloader_workers", "0", "--dataloader_threads", "2"),
                       print_fn=lambda s: None)
    second = train_loop(_cfg(mixture, tmp_path / "b", "--total_steps", "6", "--save_every", "3",
                             "--dataloader_workers", "0", "--dataloader_threads", "2"), print_fn=lambda s: None)
    assert first.final_step == 3 and second.start_step == 3 and second.final_step == 6
    assert second.resumed_from and second.resumed_from.endswith("0000003")
    losses = [(h["step"], h["ce"], h["mse"], h["lr"]) for h in straight.history]
    assert losses == [(h["step"], h["ce"], h["mse"], h["lr"]) for h in first.history + second.history]
    assert any(h["mse"] is not None for h in straight.history)   # generation targets were trained

    a, b = tmp_path / "a/mix/checkpoints/0000006", tmp_path / "b/mix/checkpoints/0000006"
    for name in (ck.MODEL_FILE, ck.EMA_FILE):
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    # the model moved, the EMA lags behind it
    w3, w6 = _weights(a.parent / "0000003" / ck.MODEL_FILE), _weights(a / ck.MODEL_FILE)
    assert any(not torch.equal(w3[k], w6[k]) for k in w6)
    # upstream layout: optimizer shard, scheduler, per-rank stream state, inference files, marker
    for f in (ck.optimizer_file(0, 1), ck.SCHEDULER_FILE, ck.stream_state_file(0, 1), "llm_config.json",
              "vit_config.json", "training_args.json", "ae.safetensors", ck.MARKER):
        assert (a / f).is_file(), f
    assert (tmp_path / "a/mix/metrics.jsonl").read_text().count("\n") == 6
    assert list((tmp_path / "a/mix/tensorboard").glob("events.out.tfevents.*"))


def test_auto_resume_newest_complete_and_loadable(mixture, tmp_path):
    from model.checkpoint import load_model_from_dir

    storage = tmp_path / "run"
    train_loop(_cfg(mixture, storage, "--total_steps", "4", "--save_every", "2", "--dataloader_workers", "0"),
               print_fn=lambda s: None)
    root = storage / "mix/checkpoints"
    # a crash mid-save at step 6 leaves a directory without its marker; tensorboard-like dirs are ignored
    shutil.copytree(root / "0000004", root / "0000006")
    (root / "0000006" / ck.MARKER).unlink()
    (root / "tensorboard").mkdir()
    again = train_loop(_cfg(mixture, storage, "--total_steps", "4", "--dataloader_workers", "0"),
                       print_fn=lambda s: None)
    assert again.start_step == 4 and again.final_step == 4 and again.history == []

    model = load_model_from_dir(root / "0000004", use_ema=True)
    ema = _weights(root / "0000004" / ck.EMA_FILE)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ema.items())

    # fine-tune from that checkpoint's EMA (no --model, no --from_scratch): the first step runs at LR 0
    # (warm-up), so the weights after it are exactly the EMA weights it started from
    ft = train_loop(_cfg(mixture, tmp_path / "ft", "--model", "None", "--from_scratch", "False",
                         "--model_path", str(root / "0000004"), "--finetune_from_ema", "True",
                         "--total_steps", "1", "--warmup_steps", "1", "--dataloader_workers", "0"), print_fn=lambda s: None)
    assert ft.start_step == 0 and ft.history[0]["lr"] == 0.0
    out = _weights(tmp_path / "ft/mix/checkpoints/0000001" / ck.MODEL_FILE)
    assert all(torch.equal(out[k], ema[k]) for k in ema)


def test_exact_resume_with_two_loader_processes(mixture, tmp_path):
    """Two loader processes per rank (stream slots 0 and 1, round-robin): resume rotates the slots so the run
    continues exactly (another loader count: tests/unit/trainer/test_resume_topology.py)."""
    quiet = {"print_fn": lambda s: None}
    args = ("--total_steps", "4", "--save_every", "2", "--dataloader_workers", "2")
    straight = train_loop(_cfg(mixture, tmp_path / "a", *args), **quiet)
    train_loop(_cfg(mixture, tmp_path / "b", *args, "--stop_at_step", "3"), **quiet)   # odd: slot 1 is next
    resumed = train_loop(_cfg(mixture, tmp_path / "b", *args), **quiet)
    assert resumed.start_step == 3
    assert [(h["ce"], h["mse"]) for h in straight.history[3:]] == [(h["ce"], h["mse"]) for h in resumed.history]
    state = json.loads((tmp_path / "b/mix/checkpoints/0000003" / ck.stream_state_file(0, 1)).read_text())
    assert state["num_slots"] == 2 and state["next_slot"] == 1 and all(state["states"])
