"""A shard folder is a Hugging Face dataset: the ingest publishes `.huggingface.yaml` (`configs:` /
`data_files:`) with the shards, so `datasets.load_dataset("shards/<dataset>")` reads the Parquet parts only,
while pandas, pyarrow and DuckDB still read the folder (a README.md card would break them).

Real ingest of the shipped example (executor="local"), real `datasets`, pandas, pyarrow and DuckDB."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from datasets_catalog.catalog import load_catalog
from pipelines.ingest import build
from pipelines.ingest.driver import run_ingest
from pipelines.storage import uris as storage

ROOT = Path(__file__).resolve().parents[4]
NAMES = ["ct_mr_vqa", "radiology_text_qa"]


def _ingest(out: Path, **kw):
    return run_ingest(load_catalog(ROOT / "catalog" / "radiology.yaml"), out=out, only=NAMES, executor="local",
                      progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    report = _ingest(out)
    assert [d.status for d in report.datasets] == ["built", "built"]
    return out


def test_the_card_is_published_with_the_shards_and_listed_in_the_manifest(shards):
    for name in NAMES:
        folder = shards / name
        card = yaml.safe_load((folder / ".huggingface.yaml").read_text())
        # what the Hub documents for a dataset card's `configs:` (one default config, one split)
        assert card["configs"] == [{"config_name": "default",
                                    "data_files": [{"split": "train", "path": "part-*.parquet"}]}]
        assert json.loads((folder / "_manifest.json").read_text())["hf_card"] == ".huggingface.yaml"
        assert not (folder / "README.md").exists()


@pytest.mark.parametrize("name", NAMES)
def test_the_readme_calls_read_the_same_rows(shards, name, tmp_path):
    folder = shards / name
    manifest = json.loads((folder / "_manifest.json").read_text())
    frame = pd.read_parquet(folder)                              # the folder, README.md-free: pyarrow skips "." / "_"
    assert len(frame) == manifest["rows_written"] == pq.read_table(folder).num_rows
    by_card = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "a"))
    by_files = datasets.load_dataset("parquet", data_dir=str(folder), data_files="part-*.parquet", split="train",
                                     cache_dir=str(tmp_path / "b"))
    assert by_card.num_rows == by_files.num_rows == len(frame)
    rows = pq.read_table(folder).to_pylist()
    for i, row in enumerate(by_card):
        assert row == by_files[i] == rows[i]
    assert frame["sample_id"].tolist() == [r["sample_id"] for r in rows]
    whole = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "c"))
    assert list(whole) == ["train"]


def test_duckdb_reads_the_folder(shards):
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"""
        SELECT s.dataset, count(*) AS rows
        FROM read_parquet('{shards}/*/part-*.parquet') AS s
        JOIN read_json_auto('{shards}/*/_manifest.json') AS m USING (dataset)
        GROUP BY ALL ORDER BY s.dataset""").fetchall()
    assert got == [("ct_mr_vqa", 6), ("radiology_text_qa", 4)]   # the README's ingest table


def test_a_folder_published_before_cards_gets_one_without_a_rebuild(tmp_path):
    out = tmp_path / "shards"
    _ingest(out)
    card = out / NAMES[0] / ".huggingface.yaml"
    card.unlink()
    manifest = json.loads((out / NAMES[0] / "_manifest.json").read_text())
    del manifest["hf_card"]
    (out / NAMES[0] / "_manifest.json").write_text(json.dumps(manifest))
    again = _ingest(out)
    assert [d.status for d in again.datasets] == ["up to date", "up to date"]
    assert card.is_file()
    assert json.loads((out / NAMES[0] / "_manifest.json").read_text())["hf_card"] == ".huggingface.yaml"


def test_the_card_never_appears_without_its_shards(tmp_path, monkeypatch):
    """The card is written into staging and swapped in by the same rename as the parts and the manifest."""
    seen = []

    def failing_publish(staging, destination, marker, marker_bytes):
        seen.append(sorted(p.name for p in Path(staging).iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(storage, "publish_tree", failing_publish)
    report = _ingest(tmp_path / "shards")
    assert [d.status for d in report.datasets] == ["failed", "failed"]
    assert seen and all(".huggingface.yaml" in names and "part-00000.parquet" in names for names in seen)
    assert not any((tmp_path / "shards" / n).exists() for n in NAMES)


def test_card_text_is_yaml_for_any_valid_name():
    for name in ("1.5", "yes", "null", "a-b_c.d"):
        assert yaml.safe_load(build.hf_card_text(name))["pretty_name"] == name
