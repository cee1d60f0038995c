"""A tiny model that memorises two shipped examples, trained by the real trainer loop in-process (world size
1, no Ray): the end-to-end tests of inference and the outputs shown in docs/inference.md come from it. It
lives with the trainer because it trains (model/ cannot import the trainer).

    python -m trainer.tiny_demo runs/tiny_demo [--steps 400]   # prints the checkpoint directory

The two records are copied verbatim from the shipped catalog (examples/radiology/annotations): the first
CT/MR VQA line and the first H&E -> IHC editing line, over the shipped images, resized small (VAE 64 px, ViT
56 px) so a 2-core CPU trains them in about 30 s of CPU time. The real pipeline runs end to end: catalog -> ingest
(local executor) -> mixture stream -> packer -> trainer loop -> checkpoint directory.

One deliberate change to the random tiny model before training (`calibrate_vae`): the VAE encoder's
log-variance output is pinned to -30, so the posterior is (numerically) its mean, and its mean output is
scaled by 8, so scaled latents have about unit spread. A trained FLUX AE has a nearly deterministic posterior
and (after its scale factor) latents of about unit variance; a randomly initialised tiny one has a posterior
std about 3x the spread of its latents' means (0.12), which would make "the memorised target latent" a wide
cloud and leave the image signal far below the flow's noise. The frozen VAE is saved with the checkpoint
(ae.safetensors), so inference uses exactly this VAE. Everything else is the trainer's default.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from datasets_catalog.transforms import ImageTransformArgs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "radiology"
VAE_ARGS = ImageTransformArgs(max_image_size=64, min_image_size=32, image_stride=16)
VIT_ARGS = ImageTransformArgs(max_image_size=56, min_image_size=28, image_stride=14, max_pixels=56 * 56)
# (dataset name in catalog/radiology.yaml, task alias, line index in its JSONL)
RECORDS = (("ct_mr_vqa", "sft", 0), ("he_to_ihc_edit", "edit", 0))
# 400 steps at a constant 4e-3 with the flow loss weighted x5 (the text memorises in ~100 steps, the latent is
# the slow part): about 30 s of CPU time. The sampled latent then lands ~0.28 (relative L2) from the target.
STEPS, LR, MSE_WEIGHT = 400, 4e-3, 5.0
# Training goes on, CHUNK steps at a time up to MAX_STEPS, until every token of both memorised answers (and
# the end token) is ahead of the runner-up by MARGIN logits when the answer is fed back token by token: greedy
# decoding then returns the answer whatever small numeric differences another torch build makes. After a fixed
# 400 steps one install's greedy answer lost a token by ~11 logits.
MARGIN, CHUNK, MAX_STEPS = 5.0, 200, 2000


def shipped_record(name: str, index: int) -> dict:
    lines = (EXAMPLES / "annotations" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads([ln for ln in lines if ln.strip()][index])


def _transform_yaml(args: ImageTransformArgs) -> str:
    return (f"{{max_image_size: {args.max_image_size}, min_image_size: {args.min_image_size}, "
            f"image_stride: {args.image_stride}, max_pixels: {args.max_pixels}}}")


def write_catalog(root: Path) -> Path:
    """root/annotations/*.jsonl (one shipped line each) + root/catalog.yaml over the shipped images."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, task, index in RECORDS:
        (root / "annotations" / f"{name}.jsonl").write_text(json.dumps(shipped_record(name, index)) + "\n")
        entries.append(f"""  - name: {name}
    task: {task}
    jsonl_path: annotations/{name}.jsonl
    data_dir: {EXAMPLES / 'images'}
    split: train
    image_transform_args: {_transform_yaml(VAE_ARGS)}
    vit_image_transform_args: {_transform_yaml(VIT_ARGS)}
""")
    catalog = root / "catalog.yaml"
    catalog.write_text("description: two shipped records for the tiny inference demo\noutput_dir: shards\n"
                       "tokenizer: builtin\ndatasets:\n" + "".join(entries))
    return catalog


def write_mixture(root: Path, catalog: Path, steps: int, seed: int, lr: float = LR,
                  mse_weight: float = MSE_WEIGHT) -> Path:
    groups = "".join(f"{task}: {{dataset_names: [{name}], weight: 1}}\n" for name, task, _ in RECORDS)
    mix = root / "tiny_demo.yaml"
    mix.write_text(f"""catalog: {catalog}
seed: {seed}
{groups}train:
  model: tiny
  from_scratch: true
  total_steps: {steps}
  warmup_steps: 10
  lr: {lr}
  lr_scheduler: constant
  mse_weight: {mse_weight}
  ema: 0.5
  save_every: {steps}
  max_checkpoints: 1
  log_every: 50
  expected_num_tokens: 600
  max_num_tokens: 900
  max_num_tokens_per_sample: 600
  prefer_buffer_before: 300
  text_cond_dropout_prob: 0.0
  vit_cond_dropout_prob: 0.0
  vae_cond_dropout_prob: 0.0
  global_seed: {seed}
  deterministic: true
  enable_tensorboard: false
""")
    return mix


MEAN_GAIN = 8.0


def calibrate_vae(model: torch.nn.Module) -> None:
    """Pin the VAE encoder's log-variance channels to -30 (posterior std e^-15) and scale its mean channels
    by MEAN_GAIN: see the module docstring."""
    conv = model.vae_model.encoder.conv_out
    z = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[:z].mul_(MEAN_GAIN)
        conv.bias[:z].mul_(MEAN_GAIN)
        conv.weight[z:].zero_()
        conv.bias[z:].fill_(-30.0)


def _builder(cfg):
    from trainer.model_setup import build_model

    built = build_model(cfg)
    calibrate_vae(built.model)
    return built.model, built.config, built.tokenizer


def _forced_margin(model, tokenizer, ctx, text: str) -> float:
    """Feed bos, then `text` and eos token by token from `ctx`; the smallest lead of the fed token's logit over
    the best other token (negative: greedy decoding would leave the text there)."""
    from model.inference.kv_cache import step_token

    token, lead = tokenizer.special.bos, float("inf")
    for target in [*tokenizer.encode(text), tokenizer.special.eos]:
        logits, ctx = step_token(model, ctx, token)
        others = logits.clone()
        others[target] = float("-inf")
        lead = min(lead, float(logits[target] - others.max()))
        token = target
    return lead


@torch.no_grad()
def answer_margins(ckpt: str | Path) -> dict[str, float]:
    """The smallest logit lead of each memorised answer, on the contexts jobs/vqa.py and jobs/generate.py
    (--understanding turn) build for the memorised prompts (tests/integration/model/test_inference_e2e.py)."""
    from model.inference.api import ImageGenerator, VQAInferencer, open_image
    from model.inference.interleave import Session

    vqa_rec, edit_rec = shipped_record("ct_mr_vqa", 0), shipped_record("he_to_ihc_edit", 0)
    vqa = VQAInferencer(ckpt, vit_transform=VIT_ARGS)
    vqa_session = Session(vqa.model, vqa.tokenizer, vit_args=VIT_ARGS, understanding_output=True, seed=42)
    vqa_session.add_vit_image(open_image(EXAMPLES / "images" / vqa_rec["input_img"][0]["path"]))
    vqa_session.add_text(vqa_rec["message"][0]["value"].split("<image>")[1].strip())
    gen = ImageGenerator(ckpt, vae_transform=VAE_ARGS, vit_transform=VIT_ARGS)
    s = Session(gen.model, gen.tokenizer, VAE_ARGS, VIT_ARGS, understanding_output=False, seed=42)
    s.add_image(open_image(EXAMPLES / "images" / edit_rec["input_img"][0]["path"]))
    s.add_text(edit_rec["message"][0]["value"].strip(), "the instruction")
    return {"vqa": _forced_margin(vqa.model, vqa.tokenizer, vqa_session.cond, vqa_rec["message"][1]["value"]),
            "edit": _forced_margin(gen.model, gen.tokenizer, s.cond, edit_rec["message"][1]["value"])}


def train_tiny_demo(root: str | Path, steps: int = STEPS, seed: int = 0, lr: float = LR, mse_weight: float = MSE_WEIGHT,
                    log=print, margin: float = MARGIN, max_steps: int = MAX_STEPS) -> Path:
    """Catalog -> ingest -> train `steps`, then on in CHUNK-step resumes until `answer_margins` reaches `margin`
    (RuntimeError past `max_steps`); returns the final checkpoint directory (root/run/tiny_demo/checkpoints/NNNNNNN)."""
    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest
    from trainer.config import load_config, validate
    from trainer.data import generation_groups
    from trainer.loop import train_loop

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    catalog = write_catalog(root)
    report = run_ingest(load_catalog(catalog), executor="local", log=lambda s: None)
    if not report.ok or any(d.rows_written < 1 for d in report.datasets):
        raise RuntimeError(f"ingest failed: {[(d.name, d.status, d.message) for d in report.datasets]}")
    mix = write_mixture(root, catalog, steps, seed, lr, mse_weight)
    total = steps
    while True:
        cfg = load_config(["--config", str(mix), "--storage_path", str(root / "run"), "--dataloader_workers", "0",
                           "--total_steps", str(total), "--save_every", str(CHUNK if total > steps else steps)])
        validate(cfg, generation_groups(cfg.mixture_path))
        result = train_loop(cfg, model_builder=_builder, print_fn=log)   # auto-resumes from the last chunk
        last = result.history[-1] if result.history else {}
        ckpt = Path(result.checkpoints[-1])
        margins = answer_margins(ckpt)
        log(f"[tiny_demo] {result.final_step} steps, last ce {last.get('ce')}, mse {last.get('mse')}, answer "
            f"logit margins {', '.join(f'{k} {v:.2f}' for k, v in margins.items())} (target {margin})")
        if min(margins.values()) >= margin:
            return ckpt
        if total + CHUNK > max_steps:
            raise RuntimeError(f"the tiny demo did not reach a logit margin of {margin} in {total} steps: {margins}")
        total += CHUNK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.tiny_demo",
                                description="Train the tiny memorising demo model on two shipped examples (CPU).")
    p.add_argument("root", type=Path, help="work folder (catalog, shards, run/)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--mse_weight", type=float, default=MSE_WEIGHT)
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"train on (in {CHUNK}-step chunks) until every memorised answer token leads by this many "
                        f"logits (default {MARGIN})")
    args = p.parse_args(argv)
    print(train_tiny_demo(args.root, args.steps, args.seed, args.lr, args.mse_weight, margin=args.margin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
