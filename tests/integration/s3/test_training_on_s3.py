"""Training with shards and checkpoints on object storage: in-process (world size 1) with a resume on a
"fresh machine", and two gloo ranks that share no disk, only the S3 endpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath
from tests.helpers.ray_nodes import free_port


def ck_is_complete(path) -> bool:
    from trainer.checkpoint import local as ck

    return ck.is_complete(path)


def test_training_reads_s3_shards_and_resumes_from_s3_checkpoints(bucket, tmp_path, monkeypatch, ingest):
    """The whole chain in-process (world size 1, no Ray): ingest to S3, train from the S3 shards with
    --storage_path s3://..., then a "fresh machine" (empty local run dir) resumes from the S3 checkpoint."""
    from datasets_catalog.catalog import load_catalog
    from trainer.checkpoint import remote as sc
    from tests.helpers.shard_factory import write_mixture
    from trainer.config import load_config, validate
    from trainer.data import generation_groups
    from trainer.loop import train_loop

    mix = write_mixture(tmp_path / "data")
    shards = bucket / "shards"
    catalog_line = next(line for line in mix.read_text().splitlines() if line.startswith("catalog:"))
    assert ingest(load_catalog(catalog_line.split(":", 1)[1].strip()), shards).ok
    mix.write_text(mix.read_text().replace(catalog_line, f"{catalog_line}\nshards: {shards}"))

    def run(node: str, steps: int, *extra: str, ray_checkpoint=None):
        monkeypatch.setenv("MEDLOOM_LOCAL_RUNS", str(tmp_path / node))
        cfg = load_config(["--config", str(mix), "--storage_path", str(bucket / "runs"), "--total_steps",
                           str(steps), "--save_every", "2", "--dataloader_workers", "0", *extra])
        validate(cfg, generation_groups(cfg.mixture_path))
        assert cfg.results_dir == tmp_path / node / "mix"
        return train_loop(cfg, print_fn=lambda s: None, ray_checkpoint=ray_checkpoint)

    first = run("node_a", 2)
    assert (first.start_step, first.final_step) == (0, 2)
    remote = bucket / "runs" / "mix" / "checkpoints"
    assert sc.newest_remote_complete(remote) == remote / "0000002"
    second = run("node_b", 3)                                   # nothing local on node_b: fetched from S3
    assert (second.start_step, second.final_step) == (2, 3)
    assert second.resumed_from == (remote / "0000002").display()
    local_b = tmp_path / "node_b" / "mix" / "checkpoints"
    assert not list(local_b.glob(".restore-*"))                 # the download is dropped once loaded
    assert sc.newest_remote_complete(remote) == remote / "0000003"
    assert ck_is_complete(local_b / "0000003")                  # world size 1: the local copy is whole

    # Ray Train restarting the group on yet another node: the reported folder (rank 0's old local copy, on
    # node_a's disk) only names the step; it is fetched from S3, even with auto_resume off, and re-saving
    # step 3 replaces the old remote copy (withdrawn first, sealed again)
    third = run("node_c", 3, "--auto_resume", "False",
                ray_checkpoint=tmp_path / "node_a" / "mix" / "checkpoints" / "0000002")
    assert (third.start_step, third.final_step) == (2, 3)
    assert third.resumed_from == (remote / "0000002").display()
    assert third.history == second.history
    assert sc.newest_remote_complete(remote) == remote / "0000003"


# -- two ranks, no shared disk: every rank uploads and fetches its own checkpoint files --------------------

def _rank_main(rank: int, world: int, port: int, mix: str, storage_path: str, local_roots: list, steps: int,
               out_dir: str) -> None:
    """One rank of a gloo group (torch.multiprocessing.spawn), with its OWN local run directory: like two
    nodes that share nothing but the S3 endpoint. Writes what it saw to out_dir/rank{r}.json."""
    import torch.distributed as dist

    from trainer.checkpoint import remote as sc
    from trainer.checkpoint import local as ck
    from trainer.config import load_config, validate
    from trainer.data import generation_groups, mandatory_coverage
    from trainer.loop import train_loop

    os.environ["MEDLOOM_LOCAL_RUNS"] = local_roots[rank]
    seen: dict = {"stream_state": "not loaded", "fetched": []}
    real_load, real_fetch = ck.load_stream_state, sc.fetch_file

    def load_stream_state(path, r, w, slots=None):
        seen["stream_state"] = real_load(path, r, w, slots)
        return seen["stream_state"]

    def fetch_file(root, step, name, local):
        ok = real_fetch(root, step, name, local)
        seen["fetched"].append([name, ok])
        return ok

    ck.load_stream_state, sc.fetch_file = load_stream_state, fetch_file
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config(["--config", mix, "--storage_path", storage_path, "--total_steps", str(steps),
                           "--save_every", "2", "--dataloader_workers", "0", "--parallelism", "fsdp",
                           "--num_workers", str(world)])
        validate(cfg, generation_groups(cfg.mixture_path), mandatory_coverage(cfg.mixture_path))
        result = train_loop(cfg, print_fn=lambda s: None)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "start": result.start_step, "final": result.final_step, "resumed_from": result.resumed_from,
        "history": [[h["step"], h["ce"], h["mse"]] for h in result.history], **seen}))


def _fsdp_mixture(root: Path) -> Path:
    """The trainer tests' tiny-model mixture (shard_factory.write_mixture), with a mandatory edit group: FSDP
    over ranks needs ViT and generation tokens in every pack (trainer.config.validate)."""
    from tests.helpers.shard_factory import make_catalog, tiny, write_config, write_mixture

    train = write_mixture(root / "base").read_text().split("train:", 1)[1]
    catalog = make_catalog(root, [tiny("vqa", "sft", rows=16, seed=1), tiny("ed", "edit", rows=16, seed=2)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 1}}
edit: {{dataset_names: [ed], weight: 1, is_mandatory: true}}
train:{train}""")


def _run_ranks(tmp_path, name: str, mix, storage_path: str, steps: int, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    roots = [str(tmp_path / f"node{r}") for r in range(world)]
    out = tmp_path / f"out_{name}"
    out.mkdir()
    mp.spawn(_rank_main, args=(world, free_port(), str(mix), storage_path, roots, steps, str(out)),
             nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_without_shared_disk_save_and_resume_through_s3(bucket, tmp_path):
    """FSDP over 2 gloo ranks, each with its own local run dir: every rank uploads its own stream state and
    optimizer shard, rank 0 seals the checkpoint. Then a crash mid-save of step 4 (rank 1's files missing,
    no marker), both local dirs wiped: auto-resume ignores step 4, every rank fetches its own files of step
    2 from S3, and steps 3-4 replay exactly (losses and bit-identical weights)."""
    import shutil

    import torch

    from trainer.checkpoint import remote as sc
    from trainer.checkpoint import local as ck

    mix = _fsdp_mixture(tmp_path / "data")
    storage_path = str(bucket / "runs")
    remote = bucket / "runs" / "mix" / "checkpoints"

    first = _run_ranks(tmp_path, "first", mix, storage_path, steps=4)
    assert [r["start"] for r in first] == [0, 0] and [r["final"] for r in first] == [4, 4]
    assert first[0]["history"] == first[1]["history"]                # global means, same on every rank
    for step in (2, 4):
        names = {n for n, _ in storage.files_under(remote / f"{step:07d}")}
        assert {ck.stream_state_file(0, 2), ck.stream_state_file(1, 2), ck.optimizer_file(0, 2),
                ck.optimizer_file(1, 2), ck.MODEL_FILE, ck.EMA_FILE, ck.MARKER} <= names
        assert sc.remote_is_complete(remote / f"{step:07d}")
    # rank 1's node holds no checkpoint folder; rank 0's holds its own part (not a whole checkpoint)
    assert not list((tmp_path / "node1" / "mix" / "checkpoints").glob("0*"))
    local0 = tmp_path / "node0" / "mix" / "checkpoints" / "0000004"
    assert (local0 / ck.MARKER).is_file() and not (local0 / ck.stream_state_file(1, 2)).exists()
    assert not ck.is_complete(local0)
    saved = {r: json.loads((remote / "0000002" / ck.stream_state_file(r, 2)).read_text()) for r in (0, 1)}
    assert saved[0] != saved[1]                                       # each rank's own stream position
    want = ck.load_safetensors(_download(remote / "0000004" / ck.MODEL_FILE, tmp_path / "w4"))

    # the crash: step 4's marker never written, rank 1's upload lost; no local disk survives
    (remote / "0000004" / ck.MARKER).unlink()
    (remote / "0000004" / ck.stream_state_file(1, 2)).unlink()
    (remote / "0000004" / ck.optimizer_file(1, 2)).unlink()
    assert sc.newest_remote_complete(remote) == remote / "0000002"
    for r in (0, 1):
        shutil.rmtree(tmp_path / f"node{r}")

    second = _run_ranks(tmp_path, "second", mix, storage_path, steps=4)
    assert [r["start"] for r in second] == [2, 2] and [r["final"] for r in second] == [4, 4]
    assert second[0]["resumed_from"] == (remote / "0000002").display()
    for r in (0, 1):
        assert second[r]["stream_state"] == saved[r]                 # each rank got its own state back
        assert second[r]["fetched"] == [[ck.optimizer_file(r, 2), True]]   # and only its own shard
        assert not list((tmp_path / f"node{r}" / "mix" / "checkpoints").glob(".restore-*"))
    assert second[0]["history"] == first[0]["history"][2:]            # steps 3-4 replay exactly
    assert sc.remote_is_complete(remote / "0000004")                  # re-saved and sealed
    got = ck.load_safetensors(_download(remote / "0000004" / ck.MODEL_FILE, tmp_path / "w4b"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _download(src: RemotePath, dst: Path) -> Path:
    storage.copy_file(src, dst)
    return dst
