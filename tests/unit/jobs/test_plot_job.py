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


def test_mixture_panels_show_weights_and_stages(tmp_path):
    """Realised sample shares next to the logged weights, token shares in their own panel, stages marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from jobs import plot as plot_job

    records = []
    for s in range(1, 9):
        first = s <= 4
        records.append({"step": s, "ce": 1.0, "lr": 1e-3, "stage_name": "one" if first else "two",
                        "stage_start_step": 0 if first else 4, "weight/a": 0.75 if first else 0.25,
                        "weight/b": 0.25 if first else 0.75, "share_samples/a": 0.7 if first else 0.3,
                        "share_samples/b": 0.3 if first else 0.7, "share_tokens/a": 0.5, "share_tokens/b": 0.5})
    captured = {}
    original = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        plot_job.plot(records, tmp_path / "c.png", "run")
    finally:
        plt.close = original
    plt.close(captured["fig"])
    axes = captured["fig"].axes
    samples, tokens = [a for a in axes if "mixture" in a.get_title()]
    labels = [line.get_label() for line in samples.get_lines()]
    assert {"a realised", "a weight", "b realised", "b weight"} <= set(labels)
    weight_a = next(line for line in samples.get_lines() if line.get_label() == "a weight")
    assert list(weight_a.get_ydata()) == [0.75] * 4 + [0.25] * 4
    assert {t.get_text().strip() for t in samples.texts} == {"one", "two"}
    assert "token" in tokens.get_title()
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
