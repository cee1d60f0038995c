"""`medloom ingest` end to end: the console command writes what `python jobs/ingest.py` writes, over the
shipped catalog (two full ingests in subprocesses)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from datasets_catalog.catalog import load_catalog
from tests.unit.jobs.test_cli import medloom, run

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "catalog" / "radiology.yaml"


def _datasets(out: Path) -> dict[str, tuple]:
    found = {}
    for manifest in sorted(out.glob("*/_manifest.json")):
        m = json.loads(manifest.read_text())
        found[manifest.parent.name] = (m["status"], m["rows_written"], m["images"], m["num_tokens"])
    return found


def test_medloom_ingest_writes_what_the_ingest_script_writes(tmp_path):
    names = set(load_catalog(CATALOG).datasets)
    cli_run = run([*medloom(), "ingest", str(CATALOG), "--out", str(tmp_path / "cli"), "--quiet"], cwd=tmp_path,
                  timeout=300)
    assert cli_run.returncode == 0, cli_run.stderr[-3000:]
    script = run([sys.executable, str(ROOT / "jobs" / "ingest.py"), str(CATALOG), "--out", str(tmp_path / "script"),
                  "--quiet"], cwd=tmp_path, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    built = _datasets(tmp_path / "cli")
    assert set(built) == names and all(status == "ok" and rows > 0 for status, rows, *_ in built.values())
    assert built == _datasets(tmp_path / "script")
