"""Object storage against a real S3-compatible server on localhost (moto in server mode, a separate process,
started once per session: tests/integration/conftest.py).

No mock of our own: the bytes go over HTTP to the server through pyarrow.fs.S3FileSystem, exactly as they
would to AWS S3 or MinIO. Fixtures here: a fresh `bucket` per test, `small_catalog` (sources and a local
ingest of them to compare with), `ingest` (the ingest's public entry point, chunks run in-process) and
`small_mixture` (a mixture config over small_catalog's two datasets).
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipelines.storage import uris as storage
from pipelines.storage.uris import RemotePath, as_path


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


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    """JSONL + PNG sources (12 VQA rows in 3 chunks, 6 text rows) and a local ingest of them to compare with."""
    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest
    from tests.helpers.shard_factory import make_catalog, tiny

    root = tmp_path_factory.mktemp("s3cat")
    path = make_catalog(root, [tiny("vqa", "sft", rows=12, seed=1), tiny("txt", "text_only", rows=6, seed=2)])
    path.write_text(path.read_text() + "rows_per_shard: 5\ntokenizer: builtin\n")
    catalog = load_catalog(path)
    local = run_ingest(catalog, out=root / "local_shards", executor="local", progress=False, log=lambda s: None)
    assert local.ok
    return catalog, root / "local_shards"


def _ingest(catalog, out, **kw):
    """The public entry point (jobs/ingest.py --out s3://...), in-process chunk execution."""
    from pipelines.ingest.driver import run_ingest

    return run_ingest(catalog, out=out, executor="local", progress=False, log=lambda s: None, **kw)


@pytest.fixture()
def ingest():
    """`ingest(catalog, out, **kw)`: jobs/ingest.py's entry point, in-process (`--out s3://...` or a folder)."""
    return _ingest


def _mixture(catalog, shards: str, name: str):
    from pipelines.mixture.config import MixtureConfig
    from tests.helpers.shard_factory import write_config

    return MixtureConfig.from_yaml(write_config(Path(catalog.path).parent / name, f"""
catalog: {catalog.path}
shards: {shards}
seed: 7
SftJSONLIterableDataset_Ver1: {{dataset_names: [vqa], weight: 2}}
SftJSONLIterableDataset_TextOnly: {{dataset_names: [txt], weight: 1}}
"""))


@pytest.fixture()
def small_mixture():
    """`small_mixture(catalog, shards, name)`: a mixture config over small_catalog's datasets read from `shards`."""
    return _mixture
