"""Inference remembers training: the transforms a checkpoint's training_args.json records are the defaults of
the Python API and the jobs; a released directory keeps UniMedVL's; explicit arguments win. A trainer
checkpoint without COMPLETE.json is refused; falling back from EMA to live weights says so in one line.
Real tiny model, real checkpoint files, real CLI entry points."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs
from model.checkpoint import save_weights, write_inference_files
from model.config import ModelConfig
from model.inference.api import ImageGenerator, VQAInferencer
from model.inference.defaults import (DefaultsError, InferenceDefaults, TrainedTransforms, read_defaults,
                                      record_for)
from model.inference.loading import InferenceError
from model.unified import UnifiedModel

ROOT = Path(__file__).resolve().parents[4]
IMAGE = ROOT / "examples/radiology/images/ct/ct_small_soft_tissue.png"
# UniMedVL's inference transforms, written out from docs/upstream-compat.md#image-generation (not imported)
UPSTREAM_VQA_VIT = ImageTransformArgs(980, 378, 14, 2007040)
UPSTREAM_GEN_VAE = ImageTransformArgs(1024, 32, 16)
UPSTREAM_GEN_VIT = ImageTransformArgs(980, 387, 14)
SMALL_VAE = ImageTransformArgs(64, 32, 16)
SMALL_VIT = ImageTransformArgs(56, 28, 14, 3136)


def _ds(name: str, task: str, vae: ImageTransformArgs, vit: ImageTransformArgs) -> TrainedTransforms:
    return TrainedTransforms(name, resolve_task_kind(task), vae, vit)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A directory in the released layout (weights, VAE, configs, tokenizer; no training files)."""
    tok = TextTokenizer.builtin()
    torch.manual_seed(0)
    model = UnifiedModel(ModelConfig.tiny(vocab_size=tok.vocab_size)).eval()
    d = tmp_path_factory.mktemp("released")
    save_weights(model, d / "ema.safetensors", include_vae=False)
    save_file({k: v.contiguous() for k, v in model.vae_model.state_dict().items()}, str(d / "ae.safetensors"))
    write_inference_files(d, model.config, tok)
    return d


def _trainer_ckpt(released: Path, where: Path, record: dict | None, complete: bool = True) -> Path:
    """The same weights in a trainer checkpoint's layout (train_state.json, stream state, marker)."""
    d = where / "checkpoints" / "0000010"
    shutil.copytree(released, d)
    args = {"lr": 1e-4, **({"inference": record} if record is not None else {})}
    (d / "training_args.json").write_text(json.dumps(args))
    (d / "train_state.json").write_text('{"step": 10}')
    (d / "stream_state.00000-of-00001.json").write_text("{}")
    if complete:
        (d / "COMPLETE.json").write_text('{"step": 10, "files": []}')
    return d


def test_record_picks_per_role_by_hand():
    big_vit = ImageTransformArgs(980, 378, 14, 2007040)
    record = record_for([
        _ds("vqa_a", "sft", SMALL_VAE, SMALL_VIT),
        _ds("vqa_b", "vlm_sft", SMALL_VAE, SMALL_VIT),
        _ds("vqa_c", "sft", SMALL_VAE, big_vit),          # outvoted 2 to 1
        _ds("fundus", "t2i", ImageTransformArgs(128, 64, 16), SMALL_VIT),
        _ds("txt", "text_only", SMALL_VAE, big_vit),      # no images: counts for no role
    ])
    assert record["vit_transform"] == asdict(SMALL_VIT)
    assert record["gen_vae_transform"] == asdict(ImageTransformArgs(128, 64, 16))
    # t2i shows no image through the ViT: generation's ViT falls back to the understanding one
    assert record["gen_vit_transform"] == asdict(SMALL_VIT)
    assert set(record["notes"]) == {"vit_transform", "gen_vit_transform"}   # the same understanding sets
    assert "2 of 3 datasets" in record["notes"]["vit_transform"] and "980,378,14,2007040 (1)" in \
        record["notes"]["vit_transform"]
    assert set(record["datasets"]) == {"vqa_a", "vqa_b", "vqa_c", "fundus", "txt"}
    # an editing set's own ViT transform wins for generation over the understanding sets'
    edit = record_for([_ds("vqa", "sft", SMALL_VAE, SMALL_VIT),
                       _ds("he", "edit", SMALL_VAE, ImageTransformArgs(112, 56, 14, 112 * 112))])
    assert edit["gen_vit_transform"] == asdict(ImageTransformArgs(112, 56, 14, 112 * 112))
    assert edit["vit_transform"] == asdict(SMALL_VIT) and edit["notes"] == {}


sizes = st.sampled_from([(56, 28, 14, 3136), (112, 56, 14, 12544), (980, 378, 14, 2007040)])
tasks = st.sampled_from(["sft", "vlm_sft", "t2i", "edit", "counterfactual", "text_only", "sft_recon_v2"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(tasks, sizes, sizes), min_size=1, max_size=6))
def test_record_round_trips_and_picks_a_most_used_transform(tmp_path_factory, rows):
    datasets = [_ds(f"d{i}", task, ImageTransformArgs(64, 32, 16, vae[3]), ImageTransformArgs(*vit))
                for i, (task, vae, vit) in enumerate(rows)]
    d = tmp_path_factory.mktemp("rt")
    (d / "training_args.json").write_text(json.dumps({"inference": record_for(datasets)}))
    got = read_defaults(d)
    und = [x.vit for x in datasets if x.task.vit_context and not x.task.generation] or \
        [x.vit for x in datasets if x.task.vit_context]
    if und:
        # the chosen one is used at least as often as any other, and is the first such in mixture order
        counts = {t: und.count(t) for t in und}
        best = max(counts.values())
        assert counts[got.vit_transform] == best and next(t for t in und if counts[t] == best) == got.vit_transform
    else:
        assert got.vit_transform == UPSTREAM_VQA_VIT
    gen = [x.vae for x in datasets if x.task.generation]
    assert got.gen_vae_transform in gen if gen else got.gen_vae_transform == UPSTREAM_GEN_VAE


def test_read_defaults_without_a_record(tmp_path):
    assert read_defaults(tmp_path) == InferenceDefaults()        # released: nothing recorded, nothing said
    assert read_defaults(tmp_path).vit_transform == UPSTREAM_VQA_VIT
    assert (read_defaults(tmp_path).gen_vae_transform, read_defaults(tmp_path).gen_vit_transform) == \
        (UPSTREAM_GEN_VAE, UPSTREAM_GEN_VIT)
    (tmp_path / "training_args.json").write_text('{"lr": 0.0001}')   # an older trainer checkpoint
    old = read_defaults(tmp_path)
    assert old.vit_transform == UPSTREAM_VQA_VIT and len(old.notes_for("vit_transform", "gen_vae_transform")) == 1
    (tmp_path / "training_args.json").write_text('{"lr": ')
    with pytest.raises(DefaultsError, match="training_args.json: not readable JSON"):
        read_defaults(tmp_path)
    (tmp_path / "training_args.json").write_text('{"inference": {"vit_transform": {"max_image_size": -1}}}')
    with pytest.raises(DefaultsError, match="inference.vit_transform"):
        read_defaults(tmp_path)


def test_api_defaults_to_the_recorded_transforms_and_flags_win(released, tmp_path):
    record = record_for([_ds("vqa", "sft", SMALL_VAE, SMALL_VIT), _ds("he", "edit", SMALL_VAE, SMALL_VIT)])
    ckpt = _trainer_ckpt(released, tmp_path, record)
    gen = ImageGenerator(ckpt)
    assert (gen.vae_transform, gen.vit_transform) == (SMALL_VAE, SMALL_VIT)
    loaded = gen._loaded
    assert VQAInferencer(ckpt).vit_transform == SMALL_VIT
    other = ImageTransformArgs(112, 56, 14, 112 * 112)
    assert VQAInferencer(ckpt, loaded=loaded, vit_transform=other).vit_transform == other
    gen = ImageGenerator(ckpt, loaded=loaded, vae_transform=ImageTransformArgs(128, 64, 16))
    assert (gen.vae_transform, gen.vit_transform) == (ImageTransformArgs(128, 64, 16), SMALL_VIT)
    # the recorded size is what generation produces without any size argument
    out = gen.infer_single(IMAGE, "Edit.", understanding="none", num_timesteps=2, cfg_text_scale=1.0)
    assert (out.width, out.height) == (128, 128)   # 128x128 input under VAE (128, 64, 16)
    # a released directory keeps UniMedVL's defaults
    gen = ImageGenerator(released)
    assert (gen.vae_transform, gen.vit_transform) == (UPSTREAM_GEN_VAE, UPSTREAM_GEN_VIT)
    assert VQAInferencer(released, loaded=gen._loaded).vit_transform == UPSTREAM_VQA_VIT


def test_cli_uses_the_recorded_transforms(released, tmp_path, monkeypatch, capsys):
    """jobs/vqa.py and jobs/generate.py without transform flags run at the recorded sizes (the Session the
    job builds is observed), with a flag at the flag's."""
    import jobs.generate
    import jobs.vqa
    from model.inference import api

    record = record_for([_ds("vqa", "sft", SMALL_VAE, SMALL_VIT), _ds("he", "edit", SMALL_VAE, SMALL_VIT)])
    ckpt = _trainer_ckpt(released, tmp_path, record)
    seen = []
    real = api.Session

    def spy(*args, **kwargs):
        s = real(*args, **kwargs)
        seen.append((s.vae_args, s.vit_args))
        return s

    monkeypatch.setattr(api, "Session", spy)
    assert jobs.vqa.main(["--model_path", str(ckpt), "--image", str(IMAGE), "--prompt", "Which?", "--greedy",
                          "--max_new_tokens", "2"]) == 0
    assert seen[-1][1] == SMALL_VIT
    assert jobs.vqa.main(["--model_path", str(ckpt), "--image", str(IMAGE), "--prompt", "Which?", "--greedy",
                          "--max_new_tokens", "2", "--vit_transform", "112,56,14,12544"]) == 0
    assert seen[-1][1] == ImageTransformArgs(112, 56, 14, 12544)
    out = tmp_path / "o.png"
    assert jobs.generate.main(["--model_path", str(ckpt), "--image", str(IMAGE), "--instruction", "Edit.",
                               "--understanding", "none", "--num_timesteps", "2", "--out", str(out)]) == 0
    assert seen[-1] == (SMALL_VAE, SMALL_VIT)
    printed = capsys.readouterr()
    assert f"wrote {out} (64x64)" in printed.out and "understanding:" not in printed.out
    assert "note:" not in printed.err


def test_trainer_checkpoint_without_marker_is_refused(released, tmp_path, capsys):
    import jobs.vqa

    done = _trainer_ckpt(released, tmp_path, None)
    partial = done.parent / "0000020"
    shutil.copytree(done, partial)
    (partial / "COMPLETE.json").unlink()
    with pytest.raises(InferenceError, match=r"without COMPLETE\.json.*e\.g\. .*0000010"):
        VQAInferencer(partial)
    assert jobs.vqa.main(["--model_path", str(partial), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model_path") and "COMPLETE.json" in err[0]
    # a released directory has no marker and needs none; neither does an upstream training directory
    assert VQAInferencer(released).vit_transform == UPSTREAM_VQA_VIT


def test_ema_fallback_is_one_note(released, tmp_path, capsys):
    live = tmp_path / "live"
    shutil.copytree(released, live)
    (live / "ema.safetensors").rename(live / "model.safetensors")
    capsys.readouterr()
    VQAInferencer(live)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {live} has no ema.safetensors: using the live weights model.safetensors (not the EMA)"]
    VQAInferencer(released)          # EMA present: nothing said
    assert capsys.readouterr().err == ""


def test_serve_engine_defaults_to_the_recorded_transforms(released, tmp_path):
    """jobs/serve.py without transform flags passes None: chat and images run at the recorded transforms."""
    from jobs.serving.engine import Engine

    record = record_for([_ds("vqa", "sft", SMALL_VAE, SMALL_VIT), _ds("he", "edit", SMALL_VAE, SMALL_VIT)])
    engine = Engine(_trainer_ckpt(released, tmp_path, record), device="cpu", dtype=None, use_ema=True,
                    vit_transform=None, gen_vae_transform=None, gen_vit_transform=None)
    assert engine.vqa.vit_transform == SMALL_VIT
    assert (engine.generator.vae_transform, engine.generator.vit_transform) == (SMALL_VAE, SMALL_VIT)
    other = ImageTransformArgs(112, 56, 14, 12544)
    engine = Engine(released, device="cpu", dtype=None, use_ema=True, vit_transform=other,
                    gen_vae_transform=None, gen_vit_transform=None)
    assert engine.vqa.vit_transform == other and engine.generator.vae_transform == UPSTREAM_GEN_VAE
