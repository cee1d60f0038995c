"""Ray Train: a run saved with 2 workers (ranks) resumes with 1 and with 3 through jobs/train.py, finishes,
says what is guaranteed, and its data continues the current pass without repeats or gaps."""
from __future__ import annotations

import json
import shutil

import pytest

from datasets_catalog.tokenizer import TextTokenizer
from jobs import train as train_job
from pipelines.mixture.config import MixtureConfig
from pipelines.mixture.dry_run import packing_from_config
from pipelines.mixture.stream import MixtureStream
from tests.helpers.shard_factory import make_catalog, tiny, write_config, write_mixture
from tests.helpers.stream_ledger import drawn_until_pass_done, pass0_ids, trained_before
from trainer.checkpoint import local as ck

pytestmark = pytest.mark.slow


def test_two_ranks_resume_with_one_and_with_three(ray_cluster, tmp_path, capsys):
    mix = write_mixture(tmp_path / "data")
    common = ["--config", str(mix), "--total_steps", "4", "--save_every", "2", "--dataloader_workers", "0"]
    first = tmp_path / "first"
    assert train_job.main([*common, "--storage_path", str(first), "--num_workers", "2", "--stop_at_step", "2"]) == 0
    ckpt = first / "mix/checkpoints/0000002"
    assert ck.is_complete(ckpt)
    old_states = [json.loads((ckpt / ck.stream_state_file(r, 2)).read_text()) for r in range(2)]
    old_states = [s["states"][0] if "states" in s else s for s in old_states]
    capsys.readouterr()

    cfg = MixtureConfig.from_yaml(mix)
    packing, tok, seed = packing_from_config(cfg), TextTokenizer.builtin(), old_states[0]["seed"]
    trained = [d for st in old_states for d in trained_before(cfg, packing, tok, st, seed)]
    for world in (1, 3):
        storage = tmp_path / f"w{world}"
        shutil.copytree(first, storage)
        assert train_job.main([*common, "--storage_path", str(storage), "--num_workers", str(world)]) == 0
        out = capsys.readouterr().out
        assert f"resumed a checkpoint of 2 rank(s) x 1 loader worker(s) with {world} x 1" in out
        assert "[train] finished: step 4" in out
        final = storage / "mix/checkpoints/0000004"
        assert ck.is_complete(final) and (final / ck.stream_state_file(world - 1, world)).is_file()
        new_draws = []
        for rank in range(world):
            loader = ck.load_stream_state(ckpt, rank, world, slots=1)
            s = MixtureStream(cfg, packing, tok, rank=rank, world_size=world, seed=seed)
            s.load_state_dict(loader["states"][0])
            new_draws += drawn_until_pass_done(s)
        for g in MixtureStream(cfg, packing, tok, seed=seed).groups:
            got = pass0_ids(trained, g.index) + pass0_ids(new_draws, g.index)
            rows = [f"{ds.name}:{i}" for ds in g.datasets for i in range(1, ds.rows + 1)]
            assert sorted(got) == sorted(rows), (world, g.name)


def test_fsdp_optimizer_shards_are_recut_for_another_world_size(ray_cluster, tmp_path, capsys):
    """FSDP over 2 ranks writes 2 optimizer shards; resuming with 3 ranks rebuilds each rank's shard from
    them (and with 1 rank, the whole state) and trains on."""
    import re

    catalog = make_catalog(tmp_path / "cat", [tiny("vqa", "sft", rows=24, seed=1), tiny("gen", "t2i", rows=16, seed=2),
                                              tiny("txt", "text_only", rows=16, seed=3), tiny("ed", "edit", rows=12, seed=4)])
    text = re.sub(r"(?m)^catalog: .*$", f"catalog: {catalog}", write_mixture(tmp_path / "data").read_text())
    # an editing group in every pack (ViT and generation units on every rank, as FSDP needs)
    mix = write_config(tmp_path / "fsdp.yaml", text.replace(
        "t2i: {dataset_names: [gen], weight: 1}",
        "t2i: {dataset_names: [gen], weight: 1}\nedit: {dataset_names: [ed], weight: 1, is_mandatory: true}"))
    common = ["--config", str(mix), "--total_steps", "4", "--save_every", "2", "--dataloader_workers", "0",
              "--parallelism", "fsdp"]
    first = tmp_path / "first"
    assert train_job.main([*common, "--storage_path", str(first), "--num_workers", "2", "--stop_at_step", "2"]) == 0
    ckpt = first / "fsdp/checkpoints/0000002"
    assert {p.name for p in ckpt.glob("optimizer.*.pt")} == {ck.optimizer_file(0, 2), ck.optimizer_file(1, 2)}
    capsys.readouterr()
    for world in (3, 1):
        storage = tmp_path / f"w{world}"
        shutil.copytree(first, storage)
        assert train_job.main([*common, "--storage_path", str(storage), "--num_workers", str(world)]) == 0
        out = capsys.readouterr().out
        assert f"with {world} x 1" in out and "[train] finished: step 4" in out
        final = storage / "fsdp/checkpoints/0000004"
        assert {p.name for p in final.glob("optimizer.*.pt")} == {ck.optimizer_file(i, world) for i in range(world)}
