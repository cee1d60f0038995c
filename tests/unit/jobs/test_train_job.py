"""jobs/train.py: an unsafe config is refused with one clear message, before anything is written."""
from __future__ import annotations

from pathlib import Path


def test_train_job_refuses_with_one_clear_message(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    cfg = root / "configs" / "radiology_sft.yaml"
    proc = subprocess.run([sys.executable, str(root / "jobs/train.py"), "--config", str(cfg), "--total_steps", "200",
                           "--warmup_steps", "2000", "--storage_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "warmup_steps (2000) is longer than training (total_steps 200)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
