"""jobs/train.py's preflight in-process (no Ray): an unchanged upstream YAML with --catalog/--shards (the
training loop reads the same catalog and shards), the catalog pinned for the workers, all argument problems
at once, no GPU with --use_gpu, and the CPU memory estimate with the train: values that fit."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs import train as train_job
from tests.helpers.shard_factory import make_catalog, tiny, write_config
from trainer.config import ConfigError, load_config, resolve_paths, validate
from trainer.loop import train_loop
from trainer.model_setup import CPU_IMAGE_PATH_BYTES_PER_TOKEN, cpu_memory_per_worker, cpu_memory_refusal

UPSTREAM = """SftJSONLIterableDataset_Ver1: {dataset_names: [vqa], weight: 2}
T2IIterableDataset_Ver1: {dataset_names: [gen], weight: 1}
"""
SMALL = ["--model", "tiny", "--from_scratch", "True", "--num_workers", "1", "--expected_num_tokens", "384",
         "--max_num_tokens", "640", "--max_num_tokens_per_sample", "384", "--prefer_buffer_before", "192",
         "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_preflight")
    catalog = make_catalog(root / "data", [tiny("vqa", "sft", 16, seed=1), tiny("gen", "t2i", 8, seed=2)])
    moved = root / "shared" / "shards"
    shutil.copytree(catalog.parent / "shards", moved)
    shutil.rmtree(catalog.parent / "shards")            # only --shards knows where they are now
    upstream = write_config(root / "upstream" / "dataset_config.yaml", UPSTREAM)
    return root, catalog, moved, upstream


def test_upstream_yaml_with_catalog_and_shards_flags_trains(data, tmp_path):
    root, catalog, moved, upstream = data
    cfg = resolve_paths(load_config(["--config", str(upstream), "--catalog", str(catalog), "--shards", str(moved),
                                     "--storage_path", str(tmp_path), "--total_steps", "2",
                                     "--dataloader_workers", "0", *SMALL]))
    problems, plan, mixture = train_job.preflight(cfg)
    assert problems == [] and plan is None                       # fresh start: nothing to resume from
    assert (mixture.catalog, mixture.shards, mixture.catalog_from) == (catalog, moved, "--catalog")
    result = train_loop(cfg, print_fn=lambda s: None)            # what each Ray worker runs
    assert result.final_step == 2 and all(h["ce"] is not None for h in result.history)


def test_without_flags_the_search_pins_the_catalog_for_the_workers(data, tmp_path, monkeypatch, capsys):
    root, catalog, moved, upstream = data
    project = tmp_path / "project"
    (project / "catalog").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    found = project / "catalog" / "mine.yaml"
    found.write_text(catalog.read_text().replace("output_dir: shards", f"output_dir: {moved}")
                     .replace("sources/", f"{catalog.parent}/sources/"))
    monkeypatch.chdir(project)
    cfg = resolve_paths(load_config(["--config", str(upstream), "--storage_path", str(tmp_path / "runs"),
                                     "--total_steps", "2", *SMALL]))
    problems, _, mixture = train_job.preflight(cfg)
    assert problems == [] and cfg.data.catalog == str(found)     # workers read this, not a search of their own
    assert mixture.catalog_from == f"found by dataset names in {project / 'catalog'}/*.yaml"


def test_every_argument_problem_comes_at_once():
    cfg = load_config(["--dataset_config_file", "x.yaml", "--model", "tiny", "--from_scratch", "True", "--total_steps", "10",
                       "--warmup_steps", "20", "--lr_scheduler", "linear", "--ema", "2", "--num_workers", "0"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert len(info.value.problems) == 4
    assert [p.split(" ")[0] for p in info.value.problems] == ["warmup_steps", "num_workers", "ema", "lr_scheduler"]


def test_use_gpu_without_a_gpu_says_so_first(data, tmp_path, monkeypatch):
    import torch

    root, catalog, moved, upstream = data
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = resolve_paths(load_config(["--config", str(upstream), "--catalog", str(catalog), "--shards", str(moved),
                                     "--storage_path", str(tmp_path), "--use_gpu", "True", *SMALL]))
    problems, _, _ = train_job.preflight(cfg)
    assert problems[0].startswith("--use_gpu True but this machine has no GPU")
    # joining a cluster (--address auto): the GPUs are the cluster's, not this machine's
    cfg.run.address = "auto"
    assert not any("no GPU" in p for p in train_job.preflight(cfg)[0])


def test_cpu_estimate_grows_by_hand_computed_bytes_per_token(tmp_path):
    cfg = load_config(["--dataset_config_file", str(tmp_path / "m.yaml"), "--model", "tiny", "--dataloader_workers", "0"])
    # tiny preset (model/config.py): hidden 128, 4 heads, 2 KV heads -> head_dim 32, kv width 64,
    # intermediate 256, 2 layers, builtin tokenizer vocab 261. Per token, fp32:
    #   decoder activations 2 layers x 4 B x (7 x 128 + 3 x 64 + 4 x 256) = 2 x 4 x 2112 = 16,896
    #   logits and their gradient over a quarter of the tokens: 8 B x 261 / 4        =    522
    #   the measured allowance for the image path                                     = 73,728
    per_token = 16_896 + 522 + CPU_IMAGE_PATH_BYTES_PER_TOKEN
    assert CPU_IMAGE_PATH_BYTES_PER_TOKEN == 73_728
    assert cpu_memory_per_worker(cfg, 8192) - cpu_memory_per_worker(cfg, 4096) == pytest.approx(4096 * per_token,
                                                                                                abs=8)


def test_cpu_refusal_names_train_values_that_fit(tmp_path):
    cfg = load_config(["--dataset_config_file", str(tmp_path / "m.yaml"), "--model", "tiny", "--num_workers", "2"])
    assert cfg.data.expected_num_tokens == 32768                # upstream packing defaults: no train: section
    need = 2 * cpu_memory_per_worker(cfg)
    lines = []
    msg = cpu_memory_refusal(cfg, print_fn=lines.append, available=int(need * 0.6))
    assert lines and lines[0].startswith("memory estimate per CPU worker: ")
    assert msg is not None and "exceeds the" in msg and "--check_memory False" in msg
    fit = msg.split("values that fit: ")[1]
    tokens = int(fit.split("expected_num_tokens: ")[1].split(",")[0])
    assert tokens < 32768 and 2 * cpu_memory_per_worker(cfg, tokens) <= need * 0.6
    assert "num_workers: 1" in fit
    assert cpu_memory_refusal(cfg, print_fn=lines.append, available=int(need * 1.01)) is None
    cfg.run.check_memory = False
    assert cpu_memory_refusal(cfg, print_fn=lines.append, available=1) is None


def test_a_truncated_eval_shard_is_named_before_the_run(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("vqa", "sft", 16, seed=1), tiny("gen", "t2i", 8, seed=2),
                                      tiny("held_out", "sft", 8, seed=3)])
    part = sorted((tmp_path / "shards" / "held_out").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    mix = write_config(tmp_path / "mix.yaml", f"catalog: {catalog}\n{UPSTREAM}eval: {{datasets: [held_out], every: 5}}\n")
    cfg = resolve_paths(load_config(["--config", str(mix), "--storage_path", str(tmp_path / "runs"), *SMALL]))
    problems, _, _ = train_job.preflight(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"{part}: shard file is unreadable (")
    assert "re-run the ingest with --force --only held_out" in problems[0]
