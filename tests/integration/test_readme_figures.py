"""The README's and docs' figures that are cheap to regenerate, regenerated: the example ingest table
(README "Quickstart") and the DuckDB outputs (README "Shards", docs/cluster.md section 7) over a fresh ingest
of the shipped catalog. Machine-dependent columns (MB, seconds) are not compared; every other number is.
Benchmark figures (ratios, timings) are labelled in the README and docs as dated snapshots with their command."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from datasets_catalog.catalog import load_catalog
from pipelines.ingest.driver import format_summary, run_ingest
from tests.helpers.readme_table import readme_ingest_table, table_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme") / "shards"
    report = run_ingest(load_catalog(ROOT / "catalog" / "radiology.yaml"), out=out, executor="local",
                        progress=False, log=lambda m: None)
    assert report.ok
    return out, report


def _block_after(text: str, marker: str) -> list[str]:
    """Lines of the first ``` block after `marker`."""
    rest = text[text.index(marker):]
    start = rest.index("```\n") + 4
    return rest[start:rest.index("```", start)].splitlines()


def test_readme_ingest_table(example_shards):
    _, report = example_shards
    shown_rows = readme_ingest_table()
    real_rows = table_rows(format_summary(report))
    datasets = [d.name for d in report.datasets]
    assert [k for k in shown_rows if k in datasets] == datasets
    for name in [*datasets, "TOTAL"]:
        # dataset, task, status, read, written, rejected, images, tokens, shards (MB and seconds: machine)
        assert shown_rows[name] == real_rows[name], (name, shown_rows[name], real_rows[name])


def _duckdb_rows(shards: Path, query: str) -> list[str]:
    duckdb = pytest.importorskip("duckdb")
    cwd = os.getcwd()
    os.chdir(shards.parent)
    try:
        return str(duckdb.sql(query)).splitlines()
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_duckdb_outputs(example_shards, doc):
    """The first DuckDB query of the page, run over the fresh shards: every output row it shows is real."""
    shards, _ = example_shards
    text = (ROOT / doc).read_text()
    match = re.search(r'duckdb\.sql\("""(.*?)"""\)\.show\(\)\n```\n', text, re.S)
    query = match.group(1)
    shown = [ln for ln in _block_after(text[match.end():], "") if ln.startswith("│")]
    assert shown, f"{doc}: no output rows shown after the DuckDB query"
    real = _duckdb_rows(shards, query)
    data_rows = [ln for ln in real if ln.startswith("│")]
    for line in shown:
        assert line in data_rows, f"{doc}: shown {line!r} is not in the real output:\n" + "\n".join(real)
