"""`medloom ingest` end to end over the shipped catalog (one full ingest in a subprocess): it writes what the
README's example ingest table shows `python jobs/ingest.py` writing (tests/integration/test_readme_commands.py
checks that table against the script itself)."""
from __future__ import annotations

import json
from pathlib import Path

from datasets_catalog.catalog import load_catalog
from tests.helpers.readme_table import readme_ingest_table
from tests.unit.jobs.test_cli import medloom, run

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "catalog" / "radiology.yaml"


def _datasets(out: Path) -> dict[str, tuple]:
    found = {}
    for manifest in sorted(out.glob("*/_manifest.json")):
        m = json.loads(manifest.read_text())
        found[manifest.parent.name] = (m["status"], m["rows_written"], m["images"], m["num_tokens"])
    return found


def _readme_table() -> dict[str, tuple]:
    """dataset -> (rows written, images, tokens) as the README's Quickstart table shows them."""
    return {name: (int(cells[4]), int(cells[6]), int(cells[7].replace(",", "")))
            for name, cells in readme_ingest_table().items() if cells[2] == "built"}


def test_medloom_ingest_writes_what_the_readme_shows(tmp_path):
    names = set(load_catalog(CATALOG).datasets)
    cli_run = run([*medloom(), "ingest", str(CATALOG), "--out", str(tmp_path / "cli"), "--quiet"], cwd=tmp_path,
                  timeout=300)
    assert cli_run.returncode == 0, cli_run.stderr[-3000:]
    built = _datasets(tmp_path / "cli")
    assert set(built) == names and all(status == "ok" and rows > 0 for status, rows, *_ in built.values())
    assert {name: (rows, images, tokens) for name, (_, rows, images, tokens) in built.items()} == _readme_table()
