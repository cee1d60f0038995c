"""The report's checks that the ingest runs on its output folder after every local run.

The ingest is an earlier stage than the report, so it cannot import these; it owns a registry
(`pipelines.ingest.driver.POST_INGEST_CHECKS`) and the ingest job fills it at start-up with
`register_ingest_checks()`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.ingest.driver import register_post_ingest_check
from pipelines.report.scan import leakage_warnings


def leakage_check(out_dir: Path, report: Any = None) -> list[str]:
    """Warning lines (without the 'WARNING:' prefix) naming rows that share an image between a train and a
    validation/test dataset of the output folder."""
    lines = leakage_warnings(out_dir)
    if not lines:
        return []
    head = lines[0].removeprefix("WARNING: ")
    return [head, *(line.strip() for line in lines[1:])]


def register_ingest_checks() -> None:
    """Have every later local ingest of this process warn about train/val leakage (idempotent)."""
    register_post_ingest_check(leakage_check)
