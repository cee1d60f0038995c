"""jobs/train.py with a checkpoint whose every `.pt` file carries a pickle payload (a shell command): through
--resume_from and through auto-resume the job refuses it on the driver, in one `error:` line naming the
file, with exit status 2, before any Ray worker starts; the command never runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.pickle_payload import Payload
from tests.helpers.shard_factory import write_mixture
from trainer.checkpoint import local as ck
from trainer.config import load_config
from trainer.loop import train_loop

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("payload")
    mixture = write_mixture(root / "data")
    cfg = load_config(["--config", str(mixture), "--storage_path", str(root / "run"), "--total_steps", "2",
                       "--save_every", "2", "--dataloader_workers", "0"])
    train_loop(cfg, print_fn=lambda s: None)
    return mixture, root / "run"


@pytest.mark.parametrize("how", ["resume_from", "auto_resume"])
def test_train_job_refuses_a_planted_checkpoint(run_dir, tmp_path, how):
    mixture, storage = run_dir
    src = tmp_path / "run"
    shutil.copytree(storage, src)
    ckpt = src / "mix/checkpoints/0000002"
    marker = tmp_path / "PWNED"
    planted = sorted(ckpt.glob("*.pt"))
    assert [p.name for p in planted] == [ck.optimizer_file(0, 1), ck.SCHEDULER_FILE]
    for f in planted:
        torch.save({"state": {}, "param_groups": [], "last_step": 2, "x": Payload(marker)}, f)
    args = ["--config", str(mixture), "--total_steps", "3", "--dataloader_workers", "0"]
    if how == "resume_from":
        args += ["--storage_path", str(tmp_path / "fresh"), "--resume_from", str(ckpt), "--from_scratch", "False"]
    else:
        args += ["--storage_path", str(src)]          # auto_resume is on by default
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), *args], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), r.stderr
    assert str(ckpt / ck.optimizer_file(0, 1)) in errors[0] and "never run code" in errors[0]
    assert "[train] run" not in r.stdout        # refused before the launch line, so before Ray
    assert not marker.exists()
