"""trainer.config: upstream defaults, CLI and YAML parsing (booleans, values, file:line errors), and the
refusals of `validate`."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.config import ConfigError, TrainConfig, coerce, load_config, parse_cli, validate


def test_defaults_are_upstream():
    c = TrainConfig()
    assert (c.train.lr, c.train.min_lr, c.train.beta1, c.train.beta2, c.train.eps) == (1e-4, 1e-7, 0.9, 0.95, 1e-15)
    assert (c.train.ema, c.train.warmup_steps, c.train.total_steps, c.train.global_seed) == (0.9999, 2000, 500_000, 4396)
    assert c.train.freeze_vae and not c.train.freeze_vit and c.train.auto_resume and c.train.max_checkpoints == 5
    assert c.model.layer_module == "Qwen2MoTDecoderLayer"          # not UMV's invalid default
    assert (c.model.vit_cond_dropout_prob, c.model.vae_cond_dropout_prob, c.model.text_cond_dropout_prob) == (0.3, 0.3, 0.1)
    assert (c.data.max_num_tokens, c.data.expected_num_tokens, c.data.data_seed) == (36864, 32768, 42)


def test_cli_booleans_and_values(tmp_path):
    cfg = load_config(["--freeze_vit", "True", "--visual_gen", "false", "--ce_loss_reweighting", "--lr=2e-5",
                       "--total_steps", "1e3", "--resume_from", "None"])
    assert cfg.train.freeze_vit is True and cfg.train.visual_gen is False and cfg.train.ce_loss_reweighting is True
    assert cfg.train.lr == 2e-5 and cfg.train.total_steps == 1000 and cfg.train.resume_from is None
    assert set(cfg.explicit) >= {"freeze_vit", "visual_gen", "lr", "total_steps"}


def test_yaml_train_section_then_flags_win(tmp_path):
    p = tmp_path / "mix.yaml"
    p.write_text("sft:\n  dataset_names: [a]\ntrain:\n  lr: 0.001\n  total_steps: 50\n  num_workers: 2\n")
    cfg = load_config(["--config", str(p), "--total_steps", "7"])
    assert cfg.train.lr == 1e-3 and cfg.train.total_steps == 7 and cfg.run.num_workers == 2
    assert cfg.run_name == "mix" and cfg.mixture_path == str(p)


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "mix.yaml"
    p.write_text("sft:\n  dataset_names: [a]\ntrain:\n  lr: 0.001\n  totl_steps: 5\n")
    with pytest.raises(ConfigError, match=r"mix.yaml:5: unknown argument 'totl_steps'.*--total_steps"):
        load_config(["--config", str(p)])
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"mix.yaml:2: lr must be a float"):
        load_config(["--config", str(p)])


def test_cli_errors():
    with pytest.raises(ConfigError, match="unknown argument 'learning_rate'"):
        parse_cli(["--learning_rate", "1"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_cli(["--lr"])
    with pytest.raises(ConfigError, match="must be True or False"):
        load_config(["--freeze_vit=maybe"])


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.sampled_from(["{}", "{!s}", "{!r}"]))
def test_coerce_bool_roundtrip(value, fmt):
    text = fmt.format(value).strip("'")
    assert coerce("freeze_vit", text, "x") is value
    assert coerce("freeze_vit", value, "x") is value


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_coerce_int(n):
    assert coerce("total_steps", str(n), "x") == n
    assert coerce("total_steps", n, "x") == n


def _ok_cfg(**kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.config = "mix.yaml"
    cfg.model.model = "tiny"
    cfg.train.from_scratch = True
    cfg.train.total_steps, cfg.train.warmup_steps = 100, 10
    for k, v in kw.items():
        cfg.set(k, v)
    return cfg


def test_validate_accepts_a_sane_config():
    cfg = _ok_cfg()
    before = cfg.to_dict()
    assert validate(cfg, ["t2i"]) is None
    assert cfg.to_dict() == before      # validate changes nothing


@pytest.mark.parametrize("name, ok, refused, message", [
    # each limit at its boundary (accepted) and one step past it (refused, the value named in the message)
    ("warmup_steps", 100, 101, r"warmup_steps \(101\) is longer than training \(total_steps 100\)"),
    ("warmup_steps", 0, -1, r"warmup_steps \(-1\)"),
    ("gradient_accumulation_steps", 1, 0, "gradient_accumulation_steps must be >= 1, got 0"),
    ("save_every", 1, 0, "save_every must be >= 1, got 0"),
    ("ema", 1.0, 1.0001, r"ema \(decay\) must be in \[0, 1\], got 1.0001"),
    ("ema", 0.0, -0.1, r"ema \(decay\) must be in \[0, 1\], got -0.1"),
    ("stop_at_step", 100, 101, r"stop_at_step must be in \[1, total_steps=100\], got 101"),
    ("stop_at_step", 1, 0, r"stop_at_step must be in \[1, total_steps=100\], got 0"),
    ("dataloader_workers", 0, -1, "dataloader_workers must be >= 0, got -1"),
])
def test_validate_boundaries(name, ok, refused, message):
    cfg = _ok_cfg(**{name: ok})
    assert cfg.get(name) == ok and validate(cfg, ["t2i"]) is None
    with pytest.raises(ConfigError, match=message):
        validate(_ok_cfg(**{name: refused}), ["t2i"])


@pytest.mark.parametrize("overrides, groups, message", [
    ({"warmup_steps": 2000, "total_steps": 200}, ["t2i"], r"warmup_steps \(2000\) is longer than training"),
    ({}, [], "visual_gen is True but the mixture has no generation dataset"),
    ({"from_scratch": False}, ["t2i"], "no weights to fine-tune from"),
    ({"layer_module": "Qwen2MoTDecoderLayer_with_hidden_outputs"}, ["t2i"], "layer_module must be one of"),
    ({"lr_scheduler": "linear"}, ["t2i"], "lr_scheduler must be one of"),
    ({"ema": 1.5}, ["t2i"], "ema"),
    ({"gradient_accumulation_steps": 0}, ["t2i"], "gradient_accumulation_steps must be >= 1"),
    ({"model": None}, ["t2i"], "no model"),
])
def test_validate_refuses_unsafe(overrides, groups, message):
    with pytest.raises(ConfigError, match=message):
        validate(_ok_cfg(**overrides), groups)


def test_fsdp_over_ranks_needs_mandatory_groups():
    cfg = _ok_cfg(num_workers=2, parallelism="fsdp")
    with pytest.raises(ConfigError, match="mark such a group `is_mandatory: true`"):
        validate(cfg, ["t2i"], {"vit": False, "gen": True})
    assert validate(cfg, ["t2i"], {"vit": True, "gen": True}) is None
    ddp = _ok_cfg(num_workers=2)
    assert ddp.run.parallelism != "fsdp"
    assert validate(ddp, ["t2i"], {"vit": False, "gen": False}) is None      # DDP on CPU: no constraint


def test_visual_gen_off_needs_no_generation_dataset():
    cfg = _ok_cfg(visual_gen=False)
    assert cfg.train.visual_gen is False and validate(cfg, []) is None
    with pytest.raises(ConfigError, match="visual_gen is True but the mixture has no generation dataset"):
        validate(_ok_cfg(visual_gen=True), [])
