"""The README's example ingest table (Quickstart, "prints (real output ...)"), parsed once for the tests that
compare an ingest's printed table or manifests with it."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def table_rows(text: str) -> dict[str, list[str]]:
    """dataset (or TOTAL) -> its cells without the machine-dependent MB and seconds, from an ingest summary."""
    rows = {}
    for line in text.splitlines():
        cells = [c for c in re.split(r"\s{2,}", line.strip()) if c]
        if len(cells) >= 9 and not cells[0].startswith("-") and cells[0] != "dataset":
            rows[cells[0]] = cells[:-2]
    return rows


def readme_ingest_table() -> dict[str, list[str]]:
    """The rows of the README's example ingest table, as `table_rows` gives them."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("prints (real output"):]
    block = block[block.index("```\n") + 4:]
    return table_rows(block[:block.index("```")])
