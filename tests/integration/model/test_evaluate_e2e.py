"""jobs/evaluate.py through the full path: a catalog of three VQA records (one open, two closed: one declared
`answer_type: CLOSED`, one by its yes/no reference) -> ingest -> the trainer memorises them (tiny model,
in-process) -> evaluate from the catalog in a subprocess.

The memorised model must score closed accuracy 1.0 and open recall 1.0; batched decoding must give the same
predictions as one at a time; a rerun into the same --out resumes (nothing redone); report.html embeds every
image it shows.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.tiny_demo import EXAMPLES, VIT_ARGS, _transform_yaml, shipped_record, VAE_ARGS

ROOT = Path(__file__).resolve().parents[3]
STEPS = 200


def memo_records() -> list[dict]:
    open_rec = shipped_record("ct_mr_vqa", 0)   # open: "An axial CT slice at the level of ..."
    image = open_rec["input_img"]
    return [open_rec,
            {"input_img": image, "answer_type": "CLOSED",
             "message": [{"from": "human", "value": "<image>\nIs this a CT image?"}, {"from": "gpt", "value": "Yes."}]},
            {"input_img": image,
             "message": [{"from": "human", "value": "<image>\nIs this an MRI?"}, {"from": "gpt", "value": "No"}]}]


def train_memo(root: Path) -> tuple[Path, Path]:
    """(catalog, checkpoint): the three records memorised by the real ingest and trainer."""
    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest
    from trainer.config import load_config, validate
    from trainer.data import generation_groups
    from trainer.loop import train_loop

    (root / "vqa_memo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in memo_records()))
    catalog = root / "catalog.yaml"
    catalog.write_text(f"""output_dir: shards
tokenizer: builtin
datasets:
  - name: vqa_memo
    task: sft
    jsonl_path: vqa_memo.jsonl
    data_dir: {EXAMPLES / 'images'}
    modality: ct
    split: test
    image_transform_args: {_transform_yaml(VAE_ARGS)}
    vit_image_transform_args: {_transform_yaml(VIT_ARGS)}
""")
    report = run_ingest(load_catalog(catalog), executor="local", log=lambda s: None)
    assert report.ok
    mix = root / "mix.yaml"
    mix.write_text(f"""catalog: {catalog}
seed: 0
sft: {{dataset_names: [vqa_memo], weight: 1}}
train:
  model: tiny
  from_scratch: true
  visual_gen: false
  total_steps: {STEPS}
  warmup_steps: 10
  lr: 4.0e-3
  lr_scheduler: constant
  ema: 0.5
  save_every: {STEPS}
  log_every: 50
  expected_num_tokens: 600
  max_num_tokens: 900
  max_num_tokens_per_sample: 600
  prefer_buffer_before: 300
  text_cond_dropout_prob: 0.0
  vit_cond_dropout_prob: 0.0
  vae_cond_dropout_prob: 0.0
  deterministic: true
  enable_tensorboard: false
""")
    cfg = load_config(["--config", str(mix), "--storage_path", str(root / "run"), "--dataloader_workers", "0"])
    validate(cfg, generation_groups(cfg.mixture_path))
    result = train_loop(cfg, print_fn=lambda s: None)
    return catalog, Path(result.checkpoints[-1])


@pytest.fixture(scope="module")
def memo(tmp_path_factory):
    return train_memo(tmp_path_factory.mktemp("memo"))


def _evaluate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_memorised_model_scores_perfectly_batched_equals_sequential_and_resumes(memo, tmp_path):
    catalog, ck = memo
    common = ["--model_path", ck, "--catalog", catalog, "--datasets", "vqa_memo", "--max_new_tokens", "160"]
    r = _evaluate(*common, "--out", tmp_path / "batched", "--batch_size", "3")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "batched" / "metrics.json").read_text())
    d = m["datasets"]["vqa_memo"]
    assert d["closed"] == {"n": 2, "accuracy": 1.0}
    assert d["open"] == {"n": 1, "recall": 1.0, "exact_match": 1.0}
    assert m["modalities"]["ct"]["n"] == 3

    r1 = _evaluate(*common, "--out", tmp_path / "single", "--batch_size", "1")
    assert r1.returncode == 0, r1.stderr
    strip = lambda p: [{k: v for k, v in json.loads(x).items()} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "batched" / "predictions.jsonl") == strip(tmp_path / "single" / "predictions.jsonl")

    again = _evaluate(*common, "--out", tmp_path / "batched")
    assert again.returncode == 0 and "0 records evaluated (0 errors), 3 already in" in again.stdout
    assert len((tmp_path / "batched" / "predictions.jsonl").read_text().splitlines()) == 3

    page = (tmp_path / "batched" / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']*)'", page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in srcs)
    assert "http" not in page and "<script" not in page
    if shutil.which("chromium"):   # the page renders in a real browser (a screenshot with content)
        shot = tmp_path / "report.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1100,1200", f"--screenshot={shot}", (tmp_path / "batched" / "report.html").as_uri()],
                       capture_output=True, timeout=120, cwd=tmp_path)
        from PIL import Image

        with Image.open(shot) as im:
            assert im.size == (1100, 1200) and len(set(im.convert("L").getdata())) > 16
