"""The ingest writing shards to object storage: the same rows as a local ingest, idempotent, and an
interrupted build never looks complete."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath


def _read_remote(folder: RemotePath):
    import pandas as pd

    manifest = json.loads((folder / "_manifest.json").read_text())
    tables = [pq.read_table((folder / s["file"]).path, filesystem=folder.fs) for s in manifest["shards"]]
    return pa.concat_tables(tables).to_pandas(), manifest


def test_ingest_to_s3_matches_local_and_is_idempotent(bucket, small_catalog, ingest):
    import pandas as pd

    catalog, local = small_catalog
    out = bucket / "shards"
    report = ingest(catalog, str(out))            # the URI string, as --out passes it
    assert report.ok and [d.status for d in report.datasets] == ["built", "built"]
    assert report.output_dir == out.display()
    names = [n for n, _ in storage.files_under(out)]
    assert names == ["txt/.huggingface.yaml", "txt/_manifest.json", "txt/_rejects.parquet", "txt/part-00000.parquet",
                     "txt/part-00001.parquet", "vqa/.huggingface.yaml", "vqa/_manifest.json", "vqa/_rejects.parquet", "vqa/part-00000.parquet",
                     "vqa/part-00001.parquet", "vqa/part-00002.parquet"]          # no staging left behind
    for name in ("vqa", "txt"):
        remote, manifest = _read_remote(out / name)
        pd.testing.assert_frame_equal(remote, pd.read_parquet(local / name))
        assert manifest["rows_written"] == json.loads((local / name / "_manifest.json").read_text())["rows_written"]
    again = ingest(catalog, out)
    assert [d.status for d in again.datasets] == ["up to date", "up to date"]

    # DuckDB over the remote parts, through a pyarrow dataset on the same pyarrow.fs (docs/cluster.md)
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as pads

    parts = pads.dataset([p.path for n, p in storage.files_under(out) if "/part-" in n], filesystem=out.fs)
    got = dict(duckdb.sql("SELECT dataset, count(*) FROM parts GROUP BY dataset").fetchall())
    assert got == {"vqa": len(pd.read_parquet(local / "vqa")), "txt": len(pd.read_parquet(local / "txt"))}


def test_interrupted_ingest_to_s3_never_looks_complete(bucket, small_catalog, monkeypatch, ingest, small_mixture):
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
        ingest(catalog, out, only=["vqa"])
    assert not storage.is_complete(out / "vqa", "_manifest.json")
    assert [n for n, _ in storage.files_under(out)] == []
    monkeypatch.setattr(storage_ingest, "process_chunk_remote", real_chunk)

    # 2. a complete build, then a forced rebuild that dies while publishing (copying parts across)
    assert ingest(catalog, out, only=["vqa"]).ok
    copies = []

    def dying_copy(src, dst):
        if isinstance(dst, RemotePath) and dst.parent == out / "vqa":   # publishing, not chunk uploads
            copies.append(dst)
            if len(copies) == 2:
                raise OSError("connection reset (simulated)")
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy_file", dying_copy)
    failed = ingest(catalog, out, only=["vqa"], force=True)   # the dataset fails alone, the run ends normally
    assert not failed.ok and failed.datasets[0].status == "failed" and "simulated" in failed.datasets[0].message
    assert len(copies) == 2
    assert not storage.is_complete(out / "vqa", "_manifest.json")   # old marker gone before any new part
    monkeypatch.setattr(storage, "copy_file", real_copy)
    from pipelines.mixture.config import MixtureConfigError
    from pipelines.mixture.sources import resolve_sources

    with pytest.raises(MixtureConfigError, match="no shards for dataset 'vqa'"):
        resolve_sources(small_mixture(catalog, str(out), "after_crash.yaml"))   # the stream refuses the half-new prefix

    # 3. the rerun cleans the dead run's staging and publishes a complete dataset again
    report = ingest(catalog, out, only=["vqa"])
    assert report.ok and report.datasets[0].status == "built"
    assert storage.is_complete(out / "vqa", "_manifest.json")
    assert not [n for n, _ in storage.files_under(out) if n.startswith(".staging-")]
