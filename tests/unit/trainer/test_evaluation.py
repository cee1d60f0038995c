"""Validation during training: the `eval:` section, its seeded subset, eval/ce at the configured steps, the
same values after a stop and resume, and best.json (real tiny model, real shards, in-process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.shard_factory import make_catalog, tiny, write_config
from trainer.config import load_config, validate
from trainer.data import generation_groups
from trainer.evaluation import EvalConfigError, parse_eval_section, select_rows
from trainer.loop import train_loop

EVAL = "eval: {datasets: [vqa_val, gen], every: 2, samples: 6, seed: 3}"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    catalog = make_catalog(root, [tiny("vqa", "sft", rows=16, seed=1), tiny("gen", "t2i", rows=12, seed=2),
                                  tiny("vqa_val", "sft", rows=10, seed=5)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 2}}
t2i: {{dataset_names: [gen], weight: 1}}
{EVAL}
train:
  model: tiny
  from_scratch: true
  warmup_steps: 2
  lr: 1.0e-3
  ema: 0.9
  log_every: 2
  expected_num_tokens: 384
  max_num_tokens: 640
  max_num_tokens_per_sample: 384
  prefer_buffer_before: 192
  deterministic: true
  enable_tensorboard: false
""")


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), "--dataloader_workers", "0", *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


def _evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/ce" in r]


def test_eval_logged_at_configured_steps_same_after_resume_and_best_json(mixture, tmp_path):
    quiet = dict(print_fn=lambda s: None)
    train_loop(_cfg(mixture, tmp_path / "a", "--total_steps", "6", "--save_every", "2"), **quiet)
    straight = _evals(tmp_path / "a" / "mix")
    assert [r["step"] for r in straight] == [2, 4, 6]
    for r in straight:
        assert r["eval/ce"] > 0 and r["eval/mse"] > 0          # VQA gives CE, t2i gives MSE
        assert r["eval/vqa_val/ce"] > 0 and r["eval/vqa_val/mse"] is None and r["eval/gen/mse"] > 0
        assert r["eval/seconds"] >= 0
    assert len({r["eval/ce"] for r in straight}) == 3           # the model changed between evaluations

    train_loop(_cfg(mixture, tmp_path / "b", "--total_steps", "6", "--save_every", "2", "--stop_at_step", "4"),
               **quiet)
    train_loop(_cfg(mixture, tmp_path / "b", "--total_steps", "6", "--save_every", "2"), **quiet)
    resumed = _evals(tmp_path / "b" / "mix")
    keys = ("step", "eval/ce", "eval/mse", "eval/vqa_val/ce", "eval/gen/mse")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]

    best = json.loads((tmp_path / "a" / "mix" / "best.json").read_text())
    low = min(straight, key=lambda r: r["eval/ce"])
    assert best["metric"] == "eval/ce" and best["value"] == low["eval/ce"] and best["step"] == low["step"]
    assert best["checkpoint"].endswith(f"{low['step']:07d}") and Path(best["checkpoint"]).is_dir()
    assert json.loads((tmp_path / "b" / "mix" / "best.json").read_text())["value"] == best["value"]


def test_subset_is_seeded_and_independent_of_row_order():
    rows = [{"sample_id": f"d:{i}"} for i in range(50)]
    a = select_rows(rows, 7, seed=11)
    assert a == select_rows(list(reversed(rows)), 7, seed=11) and len(a) == 7
    assert a != select_rows(rows, 7, seed=12)
    assert select_rows(rows[:5], 7, seed=1) == rows[:5]


@pytest.mark.parametrize("section, message", [
    ({"every": 2}, "eval.datasets must list"),
    ({"datasets": ["a"]}, "eval.every"),
    ({"datasets": ["a"], "every": 0}, "eval.every must be a whole number >= 1"),
    ({"datasets": ["a"], "every": 2, "sample": 3}, "eval.sample is not a known key"),
    ({"datasets": ["a"], "every": 2, "metric": "eval/loss"}, "eval.metric 'eval/loss' is not logged"),
    ({"datasets": ["a"], "every": 2, "ema": "yes"}, "eval.ema must be true or false"),
])
def test_eval_section_mistakes_name_the_key(section, message):
    with pytest.raises(EvalConfigError, match=message):
        parse_eval_section(section, "mix.yaml: eval")
    assert parse_eval_section(None, "x") is None
    assert parse_eval_section({"datasets": "a", "every": 5, "ema": True, "metric": "eval/a/mse"}, "x").ema


def test_ema_weights_are_evaluated_and_logged_to_tensorboard(mixture, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = mixture.read_text().replace(EVAL, EVAL.replace("seed: 3}", "seed: 3, ema: true}"))
    text = text.replace("enable_tensorboard: false", "enable_tensorboard: true")
    ema_mix = write_config(mixture.parent / "mix_ema.yaml", text)
    quiet = dict(print_fn=lambda s: None)
    train_loop(_cfg(mixture, tmp_path / "m", "--total_steps", "2", "--save_every", "2"), **quiet)
    train_loop(_cfg(ema_mix, tmp_path / "e", "--total_steps", "2", "--save_every", "2"), **quiet)
    model_eval, ema_eval = _evals(tmp_path / "m" / "mix"), _evals(tmp_path / "e" / "mix_ema")
    assert [r["step"] for r in ema_eval] == [2]
    assert ema_eval[0]["eval/ce"] != model_eval[0]["eval/ce"]    # the EMA lags behind the trained weights
    assert json.loads((tmp_path / "e" / "mix_ema" / "best.json").read_text())["ema"] is True
    events = EventAccumulator(str(tmp_path / "e" / "mix_ema" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "eval/ce" in scalars and "eval/vqa_val/ce" in scalars and "train/ce" in scalars
    assert [e.step for e in events.Scalars("eval/ce")] == [2]
