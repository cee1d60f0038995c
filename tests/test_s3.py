"""Object storage against a real S3-compatible server on localhost (moto in server mode, a separate process).

No mock of our own: the bytes go over HTTP to the server through pyarrow.fs.S3FileSystem, exactly as they
would to AWS S3 or MinIO.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath, as_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free 127.0.0.1 port; yields its endpoint URL. Dummy credentials are exported
    so the AWS SDK never probes instance metadata."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_EC2_METADATA_DISABLED")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto S3 server did not start (pip install 'moto[server]')")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def bucket(s3_server) -> RemotePath:
    """A fresh bucket; the URI carries the endpoint, so it can be handed to other processes as a string."""
    name = f"medloom-{uuid.uuid4().hex[:10]}"
    root = as_path(f"s3://{name}", endpoint=s3_server)
    with pytest.raises(storage.StorageError, match="does not exist"):
        root.mkdir()
    root.create_bucket()
    root.mkdir()
    return root


def test_remote_path_io_against_the_server(bucket):
    p = bucket / "prefix" / "a.json"
    assert not p.exists() and not (bucket / "prefix").is_dir()
    p.write_text('{"x": 1}')
    assert p.is_file() and (bucket / "prefix").is_dir() and p.size() == 8
    assert json.loads(as_path(str(p)).read_text()) == {"x": 1}          # the string carries the endpoint
    assert pickle.loads(pickle.dumps(p)).read_text() == '{"x": 1}'
    pq.write_table(pa.table({"v": list(range(10))}), (bucket / "prefix" / "t.parquet").path, filesystem=bucket.fs)
    pf = pq.ParquetFile(storage.parquet_source(str(bucket / "prefix" / "t.parquet")))
    assert pf.read().column("v").to_pylist() == list(range(10))
    assert [q.name for q in (bucket / "prefix").iterdir()] == ["a.json", "t.parquet"]
    assert [q.name for q in (bucket / "prefix").glob("*.parquet")] == ["t.parquet"]
    with pytest.raises(FileNotFoundError):
        (bucket / "prefix" / "nope").read_bytes()
    (bucket / "prefix").rmtree()
    assert list((bucket / "prefix").iterdir()) == []


def _stage(root: RemotePath, files: dict[str, bytes]) -> RemotePath:
    staging = root / f".staging-{uuid.uuid4().hex[:6]}"
    for name, data in files.items():
        (staging / name).write_bytes(data)
    return staging


def test_publish_tree_on_object_storage_marker_last_and_interrupted(bucket, monkeypatch):
    dest = bucket / "shards" / "ds"
    storage.publish_tree(_stage(bucket, {"part-00000.parquet": b"v1", "_rejects.parquet": b"r1"}), dest,
                         "_manifest.json", b'{"v": 1}')
    assert storage.is_complete(dest, "_manifest.json")
    assert sorted(n for n, _ in storage.files_under(bucket)) == [
        "shards/ds/_manifest.json", "shards/ds/_rejects.parquet", "shards/ds/part-00000.parquet"]

    # A second build dies while copying its files: the old marker is already gone, no new one is written,
    # so the folder does not look complete (readers refuse it) instead of looking complete and half new.
    real_copy = storage.copy_file
    calls = []

    def dying_copy(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("connection reset (simulated crash mid-upload)")
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy_file", dying_copy)
    staging = _stage(bucket, {"part-00000.parquet": b"v2", "part-00001.parquet": b"v2b", "_rejects.parquet": b"r2"})
    with pytest.raises(OSError, match="simulated crash"):
        storage.publish_tree(staging, dest, "_manifest.json", b'{"v": 2}')
    assert not storage.is_complete(dest, "_manifest.json")
    monkeypatch.setattr(storage, "copy_file", real_copy)

    # The rerun publishes cleanly: exactly the new files, marker written last.
    storage.publish_tree(staging, dest, "_manifest.json", b'{"v": 2}')
    assert json.loads((dest / "_manifest.json").read_text()) == {"v": 2}
    assert sorted(n for n, _ in storage.files_under(dest)) == [
        "_manifest.json", "_rejects.parquet", "part-00000.parquet", "part-00001.parquet"]
    assert not staging.exists()


def test_upload_tree_writes_marker_last(bucket, tmp_path, monkeypatch):
    local = tmp_path / "0000010"
    local.mkdir()
    for name in ("model.safetensors", "ema.safetensors", "COMPLETE.json"):
        (local / name).write_bytes(name.encode())
    order = []
    real_copy = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda s, d: (order.append(d.name), real_copy(s, d)))
    storage.upload_tree(local, bucket / "ckpt" / "0000010", marker="COMPLETE.json")
    assert order[-1] == "COMPLETE.json" and sorted(order) == sorted(p.name for p in local.iterdir())
    back = tmp_path / "back"
    storage.download_tree(bucket / "ckpt" / "0000010", back)
    assert (back / "model.safetensors").read_bytes() == b"model.safetensors"


# -- ingest into object storage ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    """JSONL + PNG sources (12 VQA rows in 3 chunks, 6 text rows) and a local ingest of them to compare with."""
    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest
    from tests.shard_factory import make_catalog, tiny

    root = tmp_path_factory.mktemp("s3cat")
    path = make_catalog(root, [tiny("vqa", "sft", rows=12, seed=1), tiny("txt", "text_only", rows=6, seed=2)])
    path.write_text(path.read_text() + "rows_per_shard: 5\ntokenizer: builtin\n")
    catalog = load_catalog(path)
    local = run_ingest(catalog, out=root / "local_shards", executor="local", progress=False, log=lambda s: None)
    assert local.ok
    return catalog, root / "local_shards"


def _read_remote(folder: RemotePath):
    import pandas as pd

    manifest = json.loads((folder / "_manifest.json").read_text())
    tables = [pq.read_table((folder / s["file"]).path, filesystem=folder.fs) for s in manifest["shards"]]
    return pa.concat_tables(tables).to_pandas(), manifest


def _ingest(catalog, out, **kw):
    """The public entry point (jobs/ingest.py --out s3://...), in-process chunk execution."""
    from pipelines.ingest.driver import run_ingest

    return run_ingest(catalog, out=out, executor="local", progress=False, log=lambda s: None, **kw)


def test_ingest_to_s3_matches_local_and_is_idempotent(bucket, small_catalog):
    import pandas as pd

    catalog, local = small_catalog
    out = bucket / "shards"
    report = _ingest(catalog, str(out))            # the URI string, as --out passes it
    assert report.ok and [d.status for d in report.datasets] == ["built", "built"]
    assert report.output_dir == out.display()
    names = [n for n, _ in storage.files_under(out)]
    assert names == ["txt/_manifest.json", "txt/_rejects.parquet", "txt/part-00000.parquet",
                     "txt/part-00001.parquet", "vqa/_manifest.json", "vqa/_rejects.parquet", "vqa/part-00000.parquet",
                     "vqa/part-00001.parquet", "vqa/part-00002.parquet"]          # no staging left behind
    for name in ("vqa", "txt"):
        remote, manifest = _read_remote(out / name)
        pd.testing.assert_frame_equal(remote, pd.read_parquet(local / name))
        assert manifest["rows_written"] == json.loads((local / name / "_manifest.json").read_text())["rows_written"]
    again = _ingest(catalog, out)
    assert [d.status for d in again.datasets] == ["up to date", "up to date"]

    # DuckDB over the remote parts, through a pyarrow dataset on the same pyarrow.fs (docs/cluster.md)
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as pads

    parts = pads.dataset([p.path for n, p in storage.files_under(out) if "/part-" in n], filesystem=out.fs)
    got = dict(duckdb.sql("SELECT dataset, count(*) FROM parts GROUP BY dataset").fetchall())
    assert got == {"vqa": len(pd.read_parquet(local / "vqa")), "txt": len(pd.read_parquet(local / "txt"))}


def test_interrupted_ingest_to_s3_never_looks_complete(bucket, small_catalog, monkeypatch):
    from pipelines.ingest import remote as storage_ingest

    catalog, _ = small_catalog
    out = bucket / "shards"
    real_chunk, real_copy = storage_ingest.process_chunk_remote, storage.copy_file

    # 1. first build of "vqa" dies in its second chunk: nothing of it is visible, staging is cleaned up
    calls = []

    def dying_chunk(task):
        calls.append(task.chunk_index)
        if len(calls) == 2:
            raise KeyboardInterrupt("worker killed (simulated)")
        return real_chunk(task)

    monkeypatch.setattr(storage_ingest, "process_chunk_remote", dying_chunk)
    with pytest.raises(KeyboardInterrupt):
        _ingest(catalog, out, only=["vqa"])
    assert not storage.is_complete(out / "vqa", "_manifest.json")
    assert [n for n, _ in storage.files_under(out)] == []
    monkeypatch.setattr(storage_ingest, "process_chunk_remote", real_chunk)

    # 2. a complete build, then a forced rebuild that dies while publishing (copying parts across)
    assert _ingest(catalog, out, only=["vqa"]).ok
    copies = []

    def dying_copy(src, dst):
        if isinstance(dst, RemotePath) and dst.parent == out / "vqa":   # publishing, not chunk uploads
            copies.append(dst)
            if len(copies) == 2:
                raise OSError("connection reset (simulated)")
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy_file", dying_copy)
    with pytest.raises(OSError, match="simulated"):
        _ingest(catalog, out, only=["vqa"], force=True)
    assert len(copies) == 2
    assert not storage.is_complete(out / "vqa", "_manifest.json")   # old marker gone before any new part
    monkeypatch.setattr(storage, "copy_file", real_copy)
    from pipelines.mixture.config import MixtureConfigError
    from pipelines.mixture.sources import resolve_sources

    with pytest.raises(MixtureConfigError, match="no shards for dataset 'vqa'"):
        resolve_sources(_mixture(catalog, str(out), "after_crash.yaml"))   # the stream refuses the half-new prefix

    # 3. the rerun cleans the dead run's staging and publishes a complete dataset again
    report = _ingest(catalog, out, only=["vqa"])
    assert report.ok and report.datasets[0].status == "built"
    assert storage.is_complete(out / "vqa", "_manifest.json")
    assert not [n for n, _ in storage.files_under(out) if n.startswith(".staging-")]



# -- the mixture stream reading shards from object storage -----------------------------------------------

def _mixture(catalog, shards: str, name: str):
    from pipelines.mixture.config import MixtureConfig
    from tests.shard_factory import write_config

    return MixtureConfig.from_yaml(write_config(Path(catalog.path).parent / name, f"""
catalog: {catalog.path}
shards: {shards}
seed: 7
SftJSONLIterableDataset_Ver1: {{dataset_names: [vqa], weight: 2}}
SftJSONLIterableDataset_TextOnly: {{dataset_names: [txt], weight: 1}}
"""))


def test_stream_reads_shards_from_s3_like_from_disk(bucket, small_catalog):
    import torch

    from datasets_catalog.tokenizer import TextTokenizer
    from pipelines.mixture.stream import MixtureStream
    from pipelines.mixture.config import MixtureConfigError
    from pipelines.mixture.sources import resolve_sources
    from pipelines.packing.config import PackingConfig

    catalog, local = small_catalog
    out = bucket / "shards"
    remote_cfg = _mixture(catalog, str(out), "remote.yaml")          # the URI carries the endpoint
    with pytest.raises(MixtureConfigError, match="no shards for dataset 'vqa'"):
        resolve_sources(remote_cfg)                                  # nothing published yet: refused
    assert _ingest(catalog, out).ok
    packing = PackingConfig(expected_num_tokens=512, max_num_tokens=768, max_num_tokens_per_sample=512,
                            prefer_buffer_before=256, max_buffer_size=4)
    tok = TextTokenizer.builtin()
    streams = [MixtureStream(c, packing, tok) for c in (_mixture(catalog, str(local), "local.yaml"), remote_cfg)]
    assert isinstance(streams[1].groups[0].datasets[0].shard_dir, RemotePath)
    plans = [[[m.sample.sample_id for m in s.next_plan().members] for _ in range(6)] for s in streams]
    assert plans[0] == plans[1] and sum(map(len, plans[0])) >= 6
    batches = [next(iter(s)) for s in streams]                        # rows with image bytes, packed
    for name in ("packed_text_ids", "packed_position_ids", "sample_lens"):
        a, b = getattr(batches[0], name), getattr(batches[1], name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
    # a state saved while reading from disk resumes reading from S3 (paths are not part of the state)
    resumed = MixtureStream(remote_cfg, packing, tok)
    resumed.load_state_dict(streams[0].state_dict())
    assert [m.sample.sample_id for m in resumed.next_plan().members] == \
        [m.sample.sample_id for m in streams[0].next_plan().members]


# -- checkpoints -------------------------------------------------------------------------------------------

def _local_checkpoint(root, step: int):
    """A real trainer checkpoint directory (trainer.checkpointing: temp dir, files, marker, rename)."""
    import torch

    from trainer import checkpointing as ck

    tmp = ck.prepare_temp(root, step)
    ck.save_safetensors({"w": torch.full((2, 2), float(step))}, tmp / ck.MODEL_FILE)
    ck.save_safetensors({"w": torch.zeros(2, 2)}, tmp / ck.EMA_FILE)
    ck.write_json(tmp / ck.stream_state_file(0, 1), {"step": step})
    return ck.finalize(root, step, [ck.MODEL_FILE, ck.EMA_FILE, ck.stream_state_file(0, 1)])


def test_checkpoints_round_trip_through_s3(bucket, tmp_path, monkeypatch):
    from trainer import checkpointing as ck
    from trainer import checkpoint_remote as sc

    remote = sc.remote_checkpoint_root(str(bucket / "runs"), "mix")
    assert remote == bucket / "runs" / "mix" / "checkpoints" and sc.remote_checkpoint_root("runs", "mix") is None
    local = tmp_path / "node_a" / "checkpoints"
    for step in (2, 4, 6):
        sc.mirror_checkpoint(_local_checkpoint(local, step), remote, keep=2)
    assert [s for s, _ in sc.remote_steps(remote)] == [4, 6]
    assert all(sc.remote_is_complete(p) for _, p in sc.remote_steps(remote))

    # an upload that dies before its marker leaves an incomplete step 8 that nobody resumes from
    real_copy = storage.copy_file

    def dying_copy(src, dst):
        if dst.name == ck.MODEL_FILE:
            raise OSError("connection reset (simulated)")
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy_file", dying_copy)
    with pytest.raises(OSError):
        sc.mirror_checkpoint(_local_checkpoint(local, 8), remote, keep=2)
    monkeypatch.setattr(storage, "copy_file", real_copy)
    assert (remote / "0000008").is_dir() and not sc.remote_is_complete(remote / "0000008")
    assert sc.newest_remote_complete(remote) == remote / "0000006"

    # a fresh machine restores the newest complete checkpoint; the trainer's own rules accept it
    other = tmp_path / "node_b" / "checkpoints"
    restored = sc.restore_newest(remote, other)
    assert restored == other / "0000006" and ck.newest_complete(other) == restored
    assert ck.load_safetensors(restored / ck.MODEL_FILE)["w"][0, 0].item() == 6.0
    assert sc.restore_newest(remote, other) is None            # nothing newer: no second download


def ck_is_complete(path) -> bool:
    from trainer import checkpointing as ck

    return ck.is_complete(path)


def test_training_reads_s3_shards_and_resumes_from_s3_checkpoints(bucket, tmp_path, monkeypatch):
    """The whole chain in-process (world size 1, no Ray): ingest to S3, train from the S3 shards with
    --storage_path s3://..., then a "fresh machine" (empty local run dir) resumes from the S3 checkpoint."""
    from datasets_catalog.catalog import load_catalog
    from trainer import checkpoint_remote as sc
    from tests.test_train_loop import write_mixture
    from trainer.config import load_config, validate
    from trainer.data import generation_groups
    from trainer.loop import train_loop

    mix = write_mixture(tmp_path / "data")
    shards = bucket / "shards"
    catalog_line = next(line for line in mix.read_text().splitlines() if line.startswith("catalog:"))
    assert _ingest(load_catalog(catalog_line.split(":", 1)[1].strip()), shards).ok
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

    from trainer import checkpoint_remote as sc
    from trainer import checkpointing as ck
    from trainer.config import load_config, validate
    from trainer.data import generation_groups, mandatory_coverage
    from trainer.loop import train_loop

    os.environ["MEDLOOM_LOCAL_RUNS"] = local_roots[rank]
    seen: dict = {"stream_state": "not loaded", "fetched": []}
    real_load, real_fetch = ck.load_stream_state, sc.fetch_file

    def load_stream_state(path, r, w):
        seen["stream_state"] = real_load(path, r, w)
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
    """tests/test_train_loop.py's tiny-model mixture, with a mandatory edit group: FSDP over ranks needs ViT
    and generation tokens in every pack (trainer.config.validate)."""
    from tests.shard_factory import make_catalog, tiny, write_config
    from tests.test_train_loop import write_mixture

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
    mp.spawn(_rank_main, args=(world, _free_port(), str(mix), storage_path, roots, steps, str(out)),
             nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_without_shared_disk_save_and_resume_through_s3(bucket, tmp_path):
    """FSDP over 2 gloo ranks, each with its own local run dir: every rank uploads its own stream state and
    optimizer shard, rank 0 seals the checkpoint. Then a crash mid-save of step 4 (rank 1's files missing,
    no marker), both local dirs wiped: auto-resume ignores step 4, every rank fetches its own files of step
    2 from S3, and steps 3-4 replay exactly (losses and bit-identical weights)."""
    import shutil

    import torch

    from trainer import checkpoint_remote as sc
    from trainer import checkpointing as ck

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


def test_remote_seal_and_rotation_rules(bucket, tmp_path):
    """seal_remote refuses (no marker) while a listed file is missing; rotation counts complete checkpoints
    only, never touches a newer incomplete one, and drops dead incomplete ones older than the newest."""
    from trainer import checkpoint_remote as sc

    root = bucket / "ckpts"
    staged = tmp_path / "stage"
    staged.mkdir()
    for name in ("model.safetensors", "stream_state.00000-of-00002.json", "stream_state.00001-of-00002.json"):
        (staged / name).write_bytes(name.encode())
    files = ["model.safetensors", "stream_state.00000-of-00002.json", "stream_state.00001-of-00002.json"]

    def save(step: int, ranks=(0, 1)) -> None:
        d = root / f"{step:07d}"
        save_id = sc.begin_remote_save(d)
        sc.upload_files(staged, ["model.safetensors"] + [files[1 + r] for r in ranks], d)
        sc.seal_remote(d, files, {"step": step, "save_id": save_id})

    with pytest.raises(ValueError, match="marker"):
        sc.upload_files(staged, [sc.MARKER], root / "0000001")
    save(1)
    with pytest.raises(RuntimeError, match="missing"):
        save(2, ranks=(0,))                                   # rank 1's upload never arrived
    assert not (root / "0000002" / sc.MARKER).exists()
    save(3)
    save(4)
    with pytest.raises(RuntimeError):
        save(5, ranks=(1,))
    assert sc.rotate_remote(root, keep=2) == [1, 2]          # complete 1 (beyond keep) and dead 2
    assert [s for s, _ in sc.remote_steps(root)] == [3, 4, 5]
    assert sc.choose_remote(root, None, auto_resume=True)[0] == 4
    assert sc.choose_remote(root, 3, auto_resume=False)[0] == 3    # Ray Train's restart step wins
    assert sc.choose_remote(root, 5, auto_resume=False)[0] == 4    # ... unless it is not complete
    assert sc.choose_remote(root, None, auto_resume=False) is None
    save(4)                                                   # a re-save withdraws the old attempt first
    assert sc.remote_is_complete(root / "0000004")
