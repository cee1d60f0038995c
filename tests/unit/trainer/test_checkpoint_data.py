"""Checkpoints are data: the optimizer and scheduler files a real run writes load with
`torch.load(weights_only=True)`, and a pickle payload planted in every `.pt` file of a checkpoint never runs
on resume (through resume_from, auto-resume or a full restore); the user gets one line naming the file."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.pickle_payload import Payload
from tests.helpers.shard_factory import write_mixture
from trainer.checkpoint import local as ck
from trainer.checkpoint.state_files import check_plain, load_state_file
from trainer.config import load_config, validate
from trainer.data import generation_groups
from trainer.loop import train_loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(mixture, storage) of a 2-step run with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("ckdata")
    mixture = write_mixture(root / "data")
    train_loop(_cfg(mixture, root / "run", "--total_steps", "2", "--save_every", "2"), print_fn=lambda s: None)
    return mixture, root / "run"


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), "--dataloader_workers", "0",
                       *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


def _plain_types(obj) -> set[str]:
    if isinstance(obj, dict):
        return {"dict"}.union(*(_plain_types(k) | _plain_types(v) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__}.union(*(_plain_types(v) for v in obj))
    return {"Tensor" if isinstance(obj, torch.Tensor) else type(obj).__name__}


def test_saved_state_files_are_plain_data(trained):
    _, storage = trained
    ckpt = storage / "mix/checkpoints/0000002"
    pts = sorted(p.name for p in ckpt.glob("*.pt"))
    assert pts == [ck.optimizer_file(0, 1), ck.SCHEDULER_FILE]
    for name in pts:
        assert zipfile.is_zipfile(ckpt / name)          # torch's zip format (memory-mappable)
        state = torch.load(ckpt / name, map_location="cpu", weights_only=True)
        # only tensors and built-in values, by inspection of what came back
        assert _plain_types(state) <= {"dict", "list", "tuple", "Tensor", "int", "float", "bool", "str",
                                       "NoneType"}, name
    sched = torch.load(ckpt / ck.SCHEDULER_FILE, weights_only=True)
    assert sched["last_step"] == 2


def _plant(ckpt: Path, marker: Path) -> list[str]:
    """A payload in every .pt of the checkpoint, inside an otherwise plausible state dict."""
    names = sorted(p.name for p in ckpt.glob("*.pt"))
    for name in names:
        torch.save({"state": {}, "param_groups": [], "last_step": 2, "x": Payload(marker)}, ckpt / name)
    return names


def test_the_payload_is_live(tmp_path):
    """Control: the planted file does run its command when unpickled the unsafe way."""
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "scheduler.pt")
    torch.load(tmp_path / "scheduler.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["resume_from", "auto_resume"])
def test_planted_payload_never_runs_on_resume(trained, tmp_path, how):
    import shutil

    mixture, storage = trained
    src = tmp_path / "run"
    shutil.copytree(storage, src)
    ckpt = src / "mix/checkpoints/0000002"
    marker = tmp_path / "PWNED"
    planted = _plant(ckpt, marker)
    assert planted == [ck.optimizer_file(0, 1), ck.SCHEDULER_FILE]
    extra = (["--resume_from", str(ckpt), "--auto_resume", "False", "--from_scratch", "False"] if how == "resume_from"
             else ["--auto_resume", "True"])
    storage_for_run = tmp_path / "other" if how == "resume_from" else src
    cfg = _cfg(mixture, storage_for_run, "--total_steps", "3", *extra)
    with pytest.raises(ck.ResumeError) as info:
        ck.plan_resume_for(cfg)          # what jobs/train.py runs on the driver before Ray starts
    msg = str(info.value)
    assert "\n" not in msg and str(ckpt / ck.optimizer_file(0, 1)) in msg
    assert "posix.system" in msg and "--resume_model_optimizer False" in msg
    with pytest.raises(ck.ResumeError):
        train_loop(cfg, print_fn=lambda s: None)   # the worker's own path refuses too
    assert not marker.exists()
    # every planted file is refused on its own, also by the full-restore loader (the scheduler after the optimizer)
    for name in planted:
        with pytest.raises(ck.ResumeError, match=name.replace(".", r"\.")):
            load_state_file(ckpt / name)
    assert not marker.exists()


def test_weights_only_resume_skips_the_state_files(trained, tmp_path):
    """The way out the message offers: --resume_model_optimizer False keeps the weights and the step, reads
    no .pt file."""
    import shutil

    mixture, storage = trained
    src = tmp_path / "run"
    shutil.copytree(storage, src)
    marker = tmp_path / "PWNED"
    _plant(src / "mix/checkpoints/0000002", marker)
    result = train_loop(_cfg(mixture, src, "--total_steps", "3", "--resume_model_optimizer", "False"),
                        print_fn=lambda s: None)
    assert result.start_step == 2 and result.final_step == 3 and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04truncated zip"])
def test_corrupt_state_file_is_one_line(tmp_path, content):
    f = tmp_path / ck.SCHEDULER_FILE
    f.write_bytes(content)
    with pytest.raises(ck.ResumeError) as info:
        load_state_file(f)
    assert "\n" not in str(info.value) and str(f) in str(info.value) and "refused" in str(info.value)


plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                  max_size=3), max_leaves=10)


@settings(max_examples=40, deadline=None)
@given(plain)
def test_check_plain_accepts_what_weights_only_loads(tmp_path_factory, value):
    check_plain(value)
    f = tmp_path_factory.mktemp("plain") / "s.pt"
    torch.save(value, f)
    assert torch.load(f, weights_only=True) == value


def test_check_plain_refuses_objects():
    with pytest.raises(TypeError, match=r"state\['x'\]\[0\].*Payload"):
        check_plain({"x": [Payload(Path("/nonexistent"))]})


def test_checkpoint_records_the_trained_transforms(trained):
    """training_args.json's "inference" record holds the transforms the shards were ingested with (read
    here from their _manifest.json), which inference then defaults to (model/inference/defaults.py)."""
    import json

    mixture, storage = trained
    record = json.loads((storage / "mix/checkpoints/0000002/training_args.json").read_text())["inference"]
    shards = mixture.parent / "shards"
    built = {d.name: json.loads((d / "_manifest.json").read_text())["transforms"] for d in shards.iterdir()
             if (d / "_manifest.json").is_file()}
    assert set(record["datasets"]) == set(built) == {"vqa", "gen", "txt"}
    for name, t in built.items():
        assert record["datasets"][name]["image_transform_args"] == t["image_transform_args"]
        assert record["datasets"][name]["vit_image_transform_args"] == t["vit_image_transform_args"]
    assert record["vit_transform"] == built["vqa"]["vit_image_transform_args"]       # the sft set
    assert record["gen_vae_transform"] == built["gen"]["image_transform_args"]       # the t2i set


def test_a_config_override_is_what_gets_recorded(trained, tmp_path):
    """A group's transform override in the mixture YAML (the stream recomputes sizes for it) is what the
    model trained at, so it is what the record holds."""
    from pipelines.mixture.config import MixtureConfig
    from trainer.checkpoint.inference_record import inference_record

    mixture, _ = trained
    text = mixture.read_text().replace(
        "sft: {dataset_names: [vqa], weight: 2}",
        "sft: {dataset_names: [vqa], weight: 2, vit_image_transform_args: "
        "{max_image_size: 112, min_image_size: 56, image_stride: 14, max_pixels: 12544}}")
    assert text != mixture.read_text()
    override = mixture.with_name("override.yaml")
    override.write_text(text)
    record = inference_record(MixtureConfig.from_yaml(str(override)))
    assert record["vit_transform"] == {"max_image_size": 112, "min_image_size": 56, "image_stride": 14,
                                       "max_pixels": 12544}
    assert record["datasets"]["vqa"]["vit_image_transform_args"]["max_image_size"] == 112


def test_truncated_weights_are_one_line_before_any_worker(trained, tmp_path):
    """A truncated model.safetensors (a copy cut short) is refused by the driver-side check, naming the file."""
    import shutil

    mixture, storage = trained
    src = tmp_path / "run"
    shutil.copytree(storage, src)
    weights = src / "mix/checkpoints/0000002" / ck.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = _cfg(mixture, src, "--total_steps", "3")
    with pytest.raises(ck.ResumeError) as info:
        ck.plan_resume_for(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{weights}: refused: not a readable safetensors file")
