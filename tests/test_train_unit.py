"""Trainer pieces that need neither Ray nor data: config parsing and refusals, schedules, EMA, optimizer
groups, loss normalisation, checkpoint directories, metrics maths, background prefetch."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer import checkpointing as ck
from trainer.config import ConfigError, TrainConfig, coerce, load_config, parse_cli, validate
from trainer.ema import ema_update, make_ema
from trainer.loss import Denominators, compute_loss
from trainer.metrics import Window, dense_params_for_flops, peak_tflops_from_name, step_flops, summarise
from trainer.optim import build_optimizer, component_of
from trainer.prefetch import Prefetcher
from trainer.schedule import WarmupScheduler, lr_factor


# ---- config -------------------------------------------------------------------------------------------
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
    validate(_ok_cfg(), ["t2i"])


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
    validate(cfg, ["t2i"], {"vit": True, "gen": True})
    validate(_ok_cfg(num_workers=2), ["t2i"], {"vit": False, "gen": False})      # DDP on CPU: no constraint


def test_visual_gen_off_needs_no_generation_dataset():
    validate(_ok_cfg(visual_gen=False), [])


def test_the_parsed_mixture_travels_pickled(tmp_path):
    """The mixture YAML is parsed once per run; loader processes (and Ray) get the parsed config by pickle."""
    import pickle

    from pipelines.packing.config import PackingConfig
    from trainer.data import StreamFactory, generation_groups, load_mixture, mandatory_coverage

    path = tmp_path / "mix.yaml"
    path.write_text("catalog: cat.yaml\nshards: s3://bucket/shards?region=us-east-1\n"
                    "sft: {dataset_names: [a], weight: 2}\nt2i: {dataset_names: [b], weight: 1, is_mandatory: true}\n"
                    "train: {lr: 1.0e-4, nested: {steps: [1, 2]}}\n")
    mixture = load_mixture(str(path))
    assert load_mixture(mixture) is mixture
    assert generation_groups(mixture) == generation_groups(str(path)) == ["t2i"]
    assert mandatory_coverage(mixture) == mandatory_coverage(str(path))
    factory = StreamFactory(mixture=mixture, packing=PackingConfig(), tokenizer_spec=None, rank=0, world_size=1,
                            seed=0)
    again = pickle.loads(pickle.dumps(factory))
    assert again == factory and again.mixture.shards.display() == "s3://bucket/shards"


# ---- schedules ----------------------------------------------------------------------------------------
def test_constant_with_warmup():
    f = [lr_factor(s, kind="constant", warmup_steps=4, total_steps=10) for s in range(7)]
    assert f == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_min_lr():
    kw = dict(kind="cosine", warmup_steps=2, total_steps=12, min_lr_rate=0.01)
    assert lr_factor(2, **kw) == pytest.approx(1.0)
    assert lr_factor(7, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(12, **kw) == pytest.approx(0.01)
    assert lr_factor(50, **kw) == pytest.approx(0.01)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(0, 50), st.integers(0, 120))
def test_cosine_bounded_and_monotone_after_warmup(warm, extra, step):
    total = warm + extra
    kw = dict(kind="cosine", warmup_steps=warm, total_steps=total, min_lr_rate=0.1)
    f, g = lr_factor(step, **kw), lr_factor(step + 1, **kw)
    assert 0.0 <= f <= 1.0
    if step >= warm:
        assert g <= f + 1e-12 and f >= 0.1 - 1e-12


def test_scheduler_per_group_and_state_roundtrip():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    sch = WarmupScheduler(opt, kind="cosine", warmup_steps=2, total_steps=10, lr=1.0, min_lr=0.1)
    for _ in range(5):
        sch.step()
    assert sch.get_last_lr()[1] == pytest.approx(0.5 * sch.get_last_lr()[0])
    opt2 = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    sch2 = WarmupScheduler(opt2, kind="cosine", warmup_steps=2, total_steps=10, lr=1.0, min_lr=0.1)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.get_last_lr() == sch.get_last_lr()


# ---- EMA ----------------------------------------------------------------------------------------------
def test_ema_matches_formula_on_a_hand_checked_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)              # a frozen tensor is never updated
    ema = make_ema(model)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        model[1].weight.copy_(torch.tensor([[9.0, 9.0]]))
        ema[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]]))
    before_frozen = ema[1].weight.clone()
    n = ema_update(ema, model, decay=0.9)
    # 0.9 * ema + 0.1 * model, by hand
    expected = torch.tensor([[0.1, 0.2, 0.3], [9.4, 9.5, 9.6]])
    assert torch.allclose(ema[0].weight, expected, atol=1e-6)
    assert torch.equal(ema[1].weight, before_frozen)
    assert n == 3  # weight + bias of layer 0, bias of layer 1


# ---- optimizer ----------------------------------------------------------------------------------------
class _Comp(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = nn.Linear(2, 2)
        self.vit_model = nn.Linear(2, 2)
        self.vae_model = nn.Linear(2, 2)
        self.connector = nn.Linear(2, 2)


def test_optimizer_groups_as_umv():
    m = _Comp()
    m.vae_model.requires_grad_(False)
    opt = build_optimizer(m, lr=1e-4, llm_lr=2e-5, vit_lr=None)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"vit_model", "language_model", "others"}   # frozen VAE left out
    assert groups["language_model"]["lr"] == 2e-5 and groups["vit_model"]["lr"] == 1e-4
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-15 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert component_of("module.vit_model.x.weight") == "vit_model" and component_of("vae2llm.weight") == "others"


# ---- loss ---------------------------------------------------------------------------------------------
def _batch(n_ce, weights=None):
    return SimpleNamespace(ce_loss_indexes=torch.arange(n_ce), num_ce_tokens=n_ce, num_mse_tokens=0,
                           ce_loss_weights=None if weights is None else torch.tensor(weights))


def test_ce_is_a_global_per_token_mean():
    # two ranks: rank 0 has 2 tokens, rank 1 has 6; DDP averages gradients over W = 2
    ce0, ce1 = torch.tensor([1.0, 3.0], requires_grad=True), torch.full((6,), 2.0, requires_grad=True)
    den = Denominators(ce=8.0, mse=0.0)
    kw = dict(ce_weight=1.0, mse_weight=1.0, reweighting=False, visual_gen=False, world=2)
    l0 = compute_loss(ce0, None, _batch(2), den, **kw).loss
    l1 = compute_loss(ce1, None, _batch(6), den, **kw).loss
    assert ((l0 + l1) / 2).item() == pytest.approx((1 + 3 + 6 * 2) / 8)
    l0.backward()
    assert torch.allclose(ce0.grad / 2, torch.full((2,), 1 / 8))   # every token weighs 1 / Σ_all N


def test_ce_reweighting_and_weights():
    ce = torch.tensor([1.0, 2.0, 4.0])
    b = _batch(3, weights=[1.0, 0.5, 0.5])
    parts = compute_loss(ce, None, b, Denominators(ce=2.0, mse=0.0), ce_weight=0.25, mse_weight=1.0,
                         reweighting=True, visual_gen=False, world=1)
    assert parts.loss.item() == pytest.approx(0.25 * (1 + 1 + 2) / 2.0)


def test_mse_mean_over_channels_and_off_without_visual_gen():
    mse = torch.ones(4, 64) * 3.0
    b = SimpleNamespace(ce_loss_indexes=None, num_ce_tokens=0, num_mse_tokens=4, ce_loss_weights=None)
    on = compute_loss(None, mse, b, Denominators(ce=0, mse=4.0), ce_weight=1, mse_weight=2.0, reweighting=False,
                      visual_gen=True, world=1)
    off = compute_loss(None, mse, b, Denominators(ce=0, mse=4.0), ce_weight=1, mse_weight=2.0, reweighting=False,
                       visual_gen=False, world=1)
    assert on.loss.item() == pytest.approx(6.0) and off.loss.item() == 0.0


# ---- checkpoint directories ---------------------------------------------------------------------------
def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = ck.prepare_temp(root, step)
    files = [ck.MODEL_FILE, ck.EMA_FILE, ck.SCHEDULER_FILE, ck.optimizer_file(0, 1), ck.stream_state_file(0, 1)]
    for f in files:
        (tmp / f).write_text("x")
    if complete:
        return ck.finalize(root, step, files)
    final = root / ck.step_dir_name(step)
    tmp.rename(final)           # looks like a checkpoint, but no marker: a crash mid-save
    return final


def test_newest_complete_ignores_incomplete_and_non_numeric(tmp_path):
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 20)
    _fake_ckpt(tmp_path, 30, complete=False)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "99999x").mkdir()
    assert ck.newest_complete(tmp_path).name == "0000020"
    assert not ck.is_complete(tmp_path / "0000030")
    # a listed file missing also makes it incomplete
    (tmp_path / "0000020" / ck.optimizer_file(0, 1)).unlink()
    assert ck.newest_complete(tmp_path).name == "0000010"


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(st.integers(0, 10**6), st.booleans(), max_size=6), st.integers(1, 3))
def test_newest_complete_and_rotation_properties(table, keep):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for step, complete in table.items():
            _fake_ckpt(root, step, complete)
        complete = sorted(s for s, c in table.items() if c)
        newest = ck.newest_complete(root)
        assert (newest is None and not complete) or int(newest.name) == complete[-1]
        ck.rotate(root, keep)
        left = [s for s, _ in ck.numeric_checkpoints(root)]
        assert [s for s in left if s in complete] == complete[-keep:]
        # incomplete directories survive only when newer than the newest complete one
        assert all(table[s] or not complete or s > complete[-1] for s in left)


def test_finalize_refuses_missing_files_and_is_atomic(tmp_path):
    tmp = ck.prepare_temp(tmp_path, 5)
    (tmp / ck.MODEL_FILE).write_text("x")
    with pytest.raises(RuntimeError, match="missing"):
        ck.finalize(tmp_path, 5, [ck.MODEL_FILE, ck.EMA_FILE])
    assert not (tmp_path / "0000005").exists() and ck.newest_complete(tmp_path) is None


def test_rotation_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 5, complete=False)
    ck.prepare_temp(tmp_path, 6)
    ck.rotate(tmp_path, keep=2)
    assert [p.name for _, p in ck.numeric_checkpoints(tmp_path)] == ["0000003", "0000004", "0000005"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_resume_plan_decision_table(tmp_path):
    root = tmp_path / "ckpts"
    _fake_ckpt(root, 4)
    _fake_ckpt(root, 8, complete=False)
    kw = dict(checkpoint_dir=root, model_path=None, resume_model_only=False, resume_model_optimizer=True)
    p = ck.plan_resume(auto_resume=True, resume_from=None, finetune_from_ema=True, **kw)
    assert p.source.name == "0000004" and p.load_train_state and p.weights_file == ck.MODEL_FILE  # ema forced off
    p = ck.plan_resume(auto_resume=False, resume_from=str(root / "0000004"), finetune_from_ema=True, **kw)
    assert p.weights_file == ck.EMA_FILE and not p.load_train_state
    p = ck.plan_resume(auto_resume=False, resume_from=str(root / "0000004"), finetune_from_ema=False, **kw)
    assert p.load_train_state
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / ck.EMA_FILE).write_text("x")
    noema = tmp_path / "noema"
    noema.mkdir()
    (noema / ck.MODEL_FILE).write_text("x")
    with pytest.raises(ck.ResumeError, match="no ema.safetensors"):   # UMV: a hard error, never random init
        ck.plan_resume(auto_resume=False, resume_from=str(noema), finetune_from_ema=True, **kw)
    with pytest.raises(ck.ResumeError, match="pass --finetune_from_ema True"):
        ck.plan_resume(auto_resume=False, resume_from=None, finetune_from_ema=False,
                       **{**kw, "model_path": str(hf)})
    p = ck.plan_resume(auto_resume=True, resume_from=None, finetune_from_ema=True,
                       **{**kw, "checkpoint_dir": tmp_path / "empty", "model_path": str(hf)})
    assert p.source == hf and p.weights_file == ck.EMA_FILE and not p.load_train_state


# ---- metrics ------------------------------------------------------------------------------------------
def test_mfu_formula_matches_upstream_count():
    llm = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=10, head_dim=4)
    # L·(3·H·I + H·(q + k + v + o)) + 2·V·H with q = o = 8, k = v = 4
    assert dense_params_for_flops(llm) == 2 * (3 * 8 * 16 + 8 * (8 + 4 + 4 + 8)) + 2 * 10 * 8
    assert step_flops(llm, 5, 25) == 6 * dense_params_for_flops(llm) * 5 + 12 * 4 * 2 * 2 * 25
    assert peak_tflops_from_name("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops_from_name("cpu") == 0.0


def test_window_summary_shares_and_wait():
    w = Window(groups=["a", "b"])
    b = SimpleNamespace(sequence_length=100, sample_lens=[60, 40], batch_data_indexes=[{}, {}],
                        metrics={"packing_efficiency": 0.5, "tokens_per_group": {"a": 75, "b": 25},
                                 "samples_per_group": {"a": 1, "b": 1}})
    w.add_batch(b)
    w.steps, w.step_time, w.data_wait, w.ce_sum, w.ce_denom = 1, 2.0, 0.1, 6.0, 3.0
    rec = summarise(w.reduce(), world=1, step=1, lr=1e-3, lrs={}, wall=2.0, device=torch.device("cpu"))
    assert rec["ce"] == 2.0 and rec["share_tokens/a"] == 0.75 and rec["data_wait_fraction"] == pytest.approx(0.05)
    assert rec["tokens_per_sec"] == 50.0 and rec["packing_efficiency"] == 0.5 and "mfu" not in rec


# ---- prefetch -----------------------------------------------------------------------------------------
def test_prefetch_thread_keeps_order_and_hides_latency():
    def slow():
        for i in range(6):
            time.sleep(0.02)
            yield i

    p = Prefetcher(lambda i, n: slow(), depth=4, mode="thread")
    got, waits = [], []
    time.sleep(0.15)           # "compute" while the loader fills the queue
    for _ in range(4):
        item, w = next(p)
        got.append(item)
        waits.append(w)
    p.close()
    assert got == [0, 1, 2, 3] and max(waits) < 0.02


def test_prefetch_surfaces_loader_errors():
    def broken():
        yield 1
        raise OSError("corrupt shard")

    p = Prefetcher(lambda i, n: broken(), depth=2, mode="thread")
    assert next(p)[0] == 1
    with pytest.raises(RuntimeError, match="corrupt shard"):
        next(p)
    p.close()


# ---- jobs ---------------------------------------------------------------------------------------------
def test_train_job_refuses_with_one_clear_message(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cfg = root / "configs" / "radiology_sft.yaml"
    proc = subprocess.run([sys.executable, str(root / "jobs/train.py"), "--config", str(cfg), "--total_steps", "200",
                           "--warmup_steps", "2000", "--storage_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "warmup_steps (2000) is longer than training (total_steps 200)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


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


def _wrap_and_report(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    """One spawned gloo rank: wrap the tiny model with FSDP2, write what this rank holds and writes."""
    import os

    import torch.distributed as dist

    from model.config import ModelConfig
    from model.unified import UnifiedModel
    from trainer.parallel import wrap_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = UnifiedModel(ModelConfig.tiny())
        par = wrap_fsdp(model, freeze_vae=True, sharding_strategy=strategy, num_replicate=1, num_shard=None,
                        cpu_offload=False, activation_checkpointing=False, device_type="cpu", param_dtype=None)
        w = model.language_model.lm_head.weight
        Path(out, f"{rank}.json").write_text(json.dumps({"local": list(w.to_local().shape), "full": list(w.shape),
                                                         "write": par.optimizer_shard,
                                                         "read": par.optimizer_load_shard}))
    finally:
        dist.destroy_process_group()


def test_fsdp_no_shard_keeps_parameters_whole_on_every_rank(tmp_path):
    """NO_SHARD: every rank holds every parameter whole (HSDP with shard groups of one); rank 0 alone writes
    the single optimizer file and every rank reads it."""
    import torch.multiprocessing as mp
    from ray_nodes import free_port

    mp.spawn(_wrap_and_report, args=(2, free_port(), "NO_SHARD", str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert all(r["local"] == r["full"] for r in reports)
    assert [r["write"] for r in reports] == [[0, 1], None] and all(r["read"] == [0, 1] for r in reports)
