"""pipelines.storage.uris without a server: URI parsing, S3 options from the environment, local atomic publish."""
from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath, StorageError, as_path, is_remote, publish_tree, s3_options

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture()
def clean_env(monkeypatch):
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_local_paths_and_file_uris_are_plain_paths(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path
    assert as_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert as_path(tmp_path) is tmp_path
    assert not is_remote(str(tmp_path)) and not is_remote(f"file://{tmp_path}") and not is_remote(None)
    assert is_remote("s3://bucket/x")
    with pytest.raises(StorageError, match="file:///abs/path"):
        as_path("file://otherhost/x")


def test_s3_uri_parsing_and_errors(clean_env):
    p = as_path("s3://bucket/medloom/shards/?endpoint_override=127.0.0.1:9000&scheme=http")
    assert isinstance(p, RemotePath)
    assert (p.bucket, p.path, p.name) == ("bucket", "bucket/medloom/shards", "shards")
    assert dict(p.options) == {"endpoint_override": "127.0.0.1:9000", "scheme": "http", "region": "us-east-1"}
    assert (p / "ds" / "_manifest.json").display() == "s3://bucket/medloom/shards/ds/_manifest.json"
    assert (p / "ds").parent == p
    assert p.display() == "s3://bucket/medloom/shards" and "endpoint_override" in str(p)
    with pytest.raises(StorageError, match="needs a bucket"):
        as_path("s3:///nobucket")
    with pytest.raises(StorageError, match="unknown S3 option 'endpoint'"):
        as_path("s3://b/x?endpoint=http://h:1")
    with pytest.raises(StorageError, match="unsupported storage scheme 'ftp'"):
        as_path("ftp://host/x")
    assert not hasattr(p, "__fspath__")   # local-only code must not silently open "s3:/..." on disk


def test_s3_options_precedence(clean_env):
    assert s3_options() == ()   # real AWS: the SDK's own chain decides region and credentials
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert dict(s3_options()) == {"endpoint_override": "generic:1", "scheme": "http", "region": "us-east-1"}
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "https://s3only:2")
    clean_env.setenv("AWS_REGION", "eu-west-1")
    assert dict(s3_options()) == {"endpoint_override": "s3only:2", "scheme": "https", "region": "eu-west-1"}
    assert dict(s3_options(endpoint="http://explicit:3"))["endpoint_override"] == "explicit:3"
    assert dict(s3_options("endpoint_override=query:4&anonymous=true", endpoint="http://explicit:3")) == {
        "endpoint_override": "query:4", "anonymous": True, "region": "eu-west-1"}


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(prefix=st.lists(_segment, min_size=0, max_size=3), parts=st.lists(_segment, min_size=1, max_size=3),
       endpoint=st.sampled_from([None, "http://127.0.0.1:9000", "https://minio.local"]))
def test_remote_path_string_round_trip(prefix, parts, endpoint):
    """str(RemotePath) is what crosses process boundaries (Ray tasks, configs): parsing it gives it back."""
    base = as_path("s3://bucket/" + "/".join(prefix), endpoint=endpoint)
    p = base.joinpath(*parts)
    assert as_path(str(p)) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert p.display() == "s3://" + "/".join(["bucket", *prefix, *parts])
    assert p.name == parts[-1]


def test_local_publish_tree_swaps_and_marker_rule(tmp_path):
    dest = tmp_path / "out" / "ds"
    staging = tmp_path / "out" / ".staging-ds"
    staging.mkdir(parents=True)
    (staging / "part-00000.parquet").write_bytes(b"v1")
    assert not storage.is_complete(staging, "_manifest.json")
    publish_tree(staging, dest, "_manifest.json", json.dumps({"v": 1}).encode())
    assert storage.is_complete(dest, "_manifest.json") and not staging.exists()
    assert (dest / "part-00000.parquet").read_bytes() == b"v1"
    # a second build replaces it whole (no file of v1 survives)
    staging.mkdir()
    (staging / "part-00001.parquet").write_bytes(b"v2")
    publish_tree(staging, dest, "_manifest.json", json.dumps({"v": 2}).encode())
    assert sorted(p.name for p in dest.iterdir()) == ["_manifest.json", "part-00001.parquet"]
    assert json.loads((dest / "_manifest.json").read_text()) == {"v": 2}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds"]


def test_upload_and_download_tree_local(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"m")
    (src / "sub" / "a.json").write_text("{}")
    (src / "COMPLETE.json").write_text("{}")
    dest = tmp_path / "remote-like"
    names = storage.upload_tree(src, dest, marker="COMPLETE.json")
    assert names[-1] == "COMPLETE.json" and sorted(names[:-1]) == ["model.safetensors", "sub/a.json"]
    back = tmp_path / "back"
    assert sorted(storage.download_tree(dest, back)) == ["COMPLETE.json", "model.safetensors", "sub/a.json"]
    assert (back / "sub" / "a.json").read_text() == "{}"


def test_ingest_output_error_never_shows_uri_credentials():
    from pipelines.ingest.driver import IngestError
    from pipelines.ingest.remote import run_ingest_remote

    with pytest.raises(IngestError) as info:
        run_ingest_remote(None, "s3://bucket/prefix?secret_key=TOPSECRET&no_such_option=1")
    assert "TOPSECRET" not in str(info.value) and "s3://bucket/prefix" in str(info.value)
