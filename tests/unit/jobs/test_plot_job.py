"""jobs/plot.py: training curves from metrics.jsonl as a PNG."""
from __future__ import annotations

import json


def test_plot_job_writes_png(tmp_path):
    from jobs.plot import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "ce": 5.0 / s, "mse": 1.0, "lr": 1e-3, "data_wait_fraction": 0.01,
              "share_tokens/a": 0.7, "share_tokens/b": 0.3} for s in (1, 2, 3)]
    lines.append({**lines[-1], "ce": 1.0})                           # a re-logged step after a restart wins
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert plot_main([str(run)]) == 0
    png = run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_main([str(tmp_path / "missing")]) == 2
