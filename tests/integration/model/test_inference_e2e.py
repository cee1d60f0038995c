"""End to end on the CPU: a tiny model trained by the trainer's loop (in-process, world size 1) on two shipped
records until it memorises them (every answer token ahead of the runner-up by trainer.tiny_demo.MARGIN logits),
then the real CLIs in subprocesses.

- jobs/vqa.py answers the memorised VQA prompt with the memorised answer (greedy), also in batch mode over
  JSONL records in the catalog format, where bad lines are reported per record; neither job nor the Python API
  is told the small transforms the demo trained at: they come from the checkpoint's training_args.json;
- jobs/generate.py, for the memorised H&E -> IHC editing instruction, writes the memorised understanding
  text and an image whose sampled latent is close to the target's VAE latent: relative L2 error below
  LATENT_TOL and below half the distance from the target to any other shipped tile's latent.

The PNG is compared through the latent it was decoded from (--save_latent), not by re-encoding it: the tiny
VAE is random (frozen, as the trainer keeps it), so decode -> encode is not an identity and re-encoding would
measure the VAE, not the model. The PNG is checked to be the VAE decode of that latent.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.checkpoint import load_model_from_dir
from model.inference.image_sampler import decode_latent
from model.inference.kv_cache import encode_vae_image
from trainer.tiny_demo import EXAMPLES, MARGIN, VAE_ARGS, answer_margins, shipped_record
from pipelines.imaging.decode import load_image_rgb

ROOT = Path(__file__).resolve().parents[3]
IMAGES = EXAMPLES / "images"
LATENT_TOL = 0.5


@pytest.fixture(scope="module")
def demo_ckpt(tiny_demo_ckpt) -> Path:
    return tiny_demo_ckpt      # tests/integration/conftest.py: trained once per session


def test_memorised_answers_lead_by_the_margin(demo_ckpt):
    """What makes the greedy answers below independent of the torch build: each answer token (and the end
    token) beats the runner-up by MARGIN logits when fed back token by token."""
    margins = answer_margins(demo_ckpt)
    assert set(margins) == {"vqa", "edit"} and min(margins.values()) >= MARGIN, margins


def _run(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_vqa_cli_answers_the_memorised_prompt(demo_ckpt, tmp_path):
    rec = shipped_record("ct_mr_vqa", 0)
    prompt = rec["message"][0]["value"].split("<image>")[1].strip()   # the text piece the SFT plan trains on
    answer = rec["message"][1]["value"]
    r = _run("vqa.py", "--model_path", demo_ckpt, "--image", IMAGES / rec["input_img"][0]["path"],
             "--prompt", prompt, "--greedy")   # no transform flags: the checkpoint's recorded ones
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == answer

    # batch over catalog-format records: the memorised record, a missing image, a broken line
    lines = [json.dumps(rec),
             json.dumps({**rec, "input_img": [{"path": "ct/nope.png"}]}),
             '{"input_img": [', ""]
    src = tmp_path / "eval.jsonl"
    src.write_text("\n".join(lines))
    out = tmp_path / "answers.jsonl"
    r = _run("vqa.py", "--model_path", demo_ckpt, "--input", src, "--output", out, "--data_dir", IMAGES,
             "--greedy")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "[vqa] 3/3 records, 2 failed" in r.stderr and "1/3 records done, 2 failed" in r.stdout
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == 3
    assert got[0]["message"][-1] == {"from": "gpt", "value": answer} and got[0]["reference"] == answer
    assert got[0]["input_img"] == rec["input_img"]
    assert "nope.png: no such file" in got[1]["error"] and "JSON" in got[2]["error"] and got[2]["line"] == 3


def test_python_api_uses_the_trained_transforms(demo_ckpt):
    """VQAInferencer / ImageGenerator with only the checkpoint path: the transforms the demo trained at
    (trainer/tiny_demo.py VAE_ARGS / VIT_ARGS), and the memorised answer."""
    from model.inference.api import ImageGenerator, VQAInferencer
    from trainer.tiny_demo import VIT_ARGS

    gen = ImageGenerator(demo_ckpt)
    assert (gen.vae_transform, gen.vit_transform) == (VAE_ARGS, VIT_ARGS)
    vqa = VQAInferencer(demo_ckpt, loaded=gen._loaded)
    assert vqa.vit_transform == VIT_ARGS
    rec = shipped_record("ct_mr_vqa", 0)
    prompt = rec["message"][0]["value"].split("<image>")[1].strip()
    assert vqa.infer_single(IMAGES / rec["input_img"][0]["path"], prompt, do_sample=False) == rec["message"][1]["value"]


def test_generate_cli_reproduces_the_memorised_edit(demo_ckpt, tmp_path):
    rec = shipped_record("he_to_ihc_edit", 0)
    instruction = rec["message"][0]["value"].strip()    # edit plans keep the human text verbatim (tag included)
    out, lat = tmp_path / "ihc.png", tmp_path / "ihc_latent.safetensors"
    r = _run("generate.py", "--model_path", demo_ckpt, "--image", IMAGES / rec["input_img"][0]["path"],
             "--instruction", instruction, "--understanding", "turn", "--cfg_text_scale", "1", "--out", out,
             "--save_latent", lat, "--json")   # VAE 64 / ViT 56 px from the checkpoint's training_args.json
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["understanding"] == rec["message"][1]["value"]          # memorised text, generated first
    assert (summary["width"], summary["height"]) == (64, 64)

    model = load_model_from_dir(demo_ckpt).eval()

    def latent(path: str) -> torch.Tensor:
        return encode_vae_image(model, load_image_rgb(None, IMAGES / path), VAE_ARGS)[0]

    target = latent(rec["output_img"][0]["path"])
    others = {p: latent(p) for p in ("pathology/he_tile0.png", "pathology/ihc_tile1.png", "pathology/ihc_tile2.png")}
    generated = load_file(str(lat))["latent"]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    err = rel(generated, target)
    nearest_other = min(rel(o, target) for o in others.values())
    print(f"\nlatent relative L2 error vs memorised target: {err:.3f} (tolerance {LATENT_TOL}); "
          f"other shipped tiles are {nearest_other:.3f}+ away from the target")
    assert err < LATENT_TOL and err < 0.5 * nearest_other
    # the PNG is the VAE decode of that latent (8-bit; +-1 for float rounding across thread counts)
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert np.abs(png - np.asarray(decode_latent(model, generated, 64, 64)).astype(int)).max() <= 1


def test_cli_user_mistakes(demo_ckpt, tmp_path):
    """One line, exit 2, no traceback (the API-level messages are tested in test_inference_core)."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    r = _run("generate.py", "--model_path", demo_ckpt, "--image", bad, "--instruction", "Edit.", "--out",
             tmp_path / "o.png", "--understanding", "none", "--num_timesteps", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"image {bad}: cannot be read" in r.stderr and not (tmp_path / "o.png").exists()
    r = _run("vqa.py", "--model_path", tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing llm_config.json" in r.stderr and "must contain" in r.stderr
