"""pipelines.storage against the localhost S3 server: RemotePath I/O, publish_tree (marker last, an
interrupted publish never looks complete), upload_tree / download_tree."""
from __future__ import annotations

import json
import pickle
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath, as_path


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
