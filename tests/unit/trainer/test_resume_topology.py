"""Resuming with another topology: optimizer shards re-cut for another FSDP shard count, and a real
training run saved with 2 loader workers resumed with 1 and with 3 that finishes and whose data covers the
current pass without repeats or gaps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from datasets_catalog.tokenizer import TextTokenizer
from pipelines.mixture.config import MixtureConfig
from pipelines.mixture.dry_run import packing_from_config
from pipelines.mixture.stream import MixtureStream
from tests.helpers.shard_factory import write_mixture
from tests.helpers.stream_ledger import drawn_until_pass_done, pass0_ids, trained_before
from trainer.checkpoint import local as ck
from trainer.checkpoint.reshard import reshard_optimizer, saved_topology
from trainer.config import load_config, validate
from trainer.data import generation_groups
from trainer.loop import train_loop


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 13), old=st.integers(1, 5), new=st.integers(1, 5))
def test_optimizer_shards_recut_for_another_shard_count(rows, old, new):
    full = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    shards = [{"state": {0: {"step": torch.tensor(7.0), "exp_avg": piece.clone()}},
               "param_groups": [{"lr": 0.1, "params": [0]}]} for piece in torch.chunk(full, old)]
    shards += [{"state": {0: {"step": torch.tensor(7.0), "exp_avg": full[:0].clone()}},
                "param_groups": [{"lr": 0.1, "params": [0]}]} for _ in range(old - len(shards))]  # empty pieces
    pieces = [reshard_optimizer(shards, i, new)["state"][0] for i in range(new)]
    assert torch.equal(torch.cat([p["exp_avg"] for p in pieces]), full)          # nothing lost or repeated
    sizes = [len(p["exp_avg"]) for p in pieces]
    step = -(-rows // new)                                                          # torch.chunk's rule
    assert sizes == [max(0, min(step, rows - i * step)) for i in range(new)]
    assert all(float(p["step"]) == 7.0 for p in pieces)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    return write_mixture(tmp_path_factory.mktemp("topology_data"))


def _cfg(mixture: Path, storage: Path, *extra: str):
    cfg = load_config(["--config", str(mixture), "--storage_path", str(storage), *extra])
    validate(cfg, generation_groups(cfg.mixture_path))
    return cfg


@pytest.mark.parametrize("new_workers", [1, 3])
def test_saved_with_two_loader_workers_resumes_with_another_count(mixture, tmp_path_factory, new_workers):
    quiet = {"print_fn": lambda s: None}
    storage = tmp_path_factory.mktemp(f"topo{new_workers}")
    first = train_loop(_cfg(mixture, storage, "--total_steps", "6", "--save_every", "3", "--stop_at_step", "3",
                            "--dataloader_workers", "2"), **quiet)
    ckpt = storage / "mix/checkpoints/0000003"
    assert first.final_step == 3 and saved_topology(ckpt) == (1, 2)
    old_states = json.loads((ckpt / ck.stream_state_file(0, 1)).read_text())["states"]
    kept = storage / "kept"
    shutil.copytree(ckpt, kept)   # rotation may remove it once the resumed run saves
    resumed = train_loop(_cfg(mixture, storage, "--total_steps", "6", "--save_every", "3",
                              "--dataloader_workers", str(new_workers)), **quiet)
    assert resumed.start_step == 3 and resumed.final_step == 6 and len(resumed.history) == 3
    assert all(h["ce"] is not None for h in resumed.history)
    final = json.loads((storage / "mix/checkpoints/0000006" / ck.stream_state_file(0, 1)).read_text())
    assert final["num_slots"] == new_workers and all(s["next_step"] >= 6 for s in final["states"])

    # the data: what the old slots trained, plus what the new slots draw from the state the trainer loaded,
    # covers pass 0 of every group exactly once
    cfg = MixtureConfig.from_yaml(mixture)
    packing = packing_from_config(cfg)
    tok = TextTokenizer.builtin()
    seed = old_states[0]["seed"]
    trained = [d for st in old_states for d in trained_before(cfg, packing, tok, st, seed)]
    loader = ck.load_stream_state(kept, 0, 1, slots=new_workers)
    assert loader["num_slots"] == new_workers and loader["states"][0]["step_offset"] == 3
    new_draws = []
    for slot in range(new_workers):
        s = MixtureStream(cfg, packing, tok, rank=0, world_size=1, worker_id=slot, num_workers=new_workers, seed=seed)
        s.load_state_dict(loader["states"][slot])
        new_draws += drawn_until_pass_done(s)
    groups = MixtureStream(cfg, packing, tok, seed=seed).groups
    for g in groups:
        got = pass0_ids(trained, g.index) + pass0_ids(new_draws, g.index)
        rows = [f"{ds.name}:{i}" for ds in g.datasets for i in range(1, ds.rows + 1)]
        assert sorted(got) == sorted(rows), g.name
