"""ShareGPT- and OpenAI-style JSONL through a catalog column mapping (`columns:` / `tags:`) ingest without a
conversion script: the shards equal those of the same records in the native UMV format (all columns but the
dataset name and the sample id, which carries it), and bad lines are rejected on the same lines for the same
reasons. Real ingest (executor="local"), real PNG files, real Parquet."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets_catalog.catalog import load_catalog
from pipelines.ingest.driver import run_ingest

ROOT = Path(__file__).resolve().parents[4]
CT = ROOT / "examples" / "radiology" / "images" / "ct"

# (native UMV messages, input images, extra top-level fields) per line; None = the same raw line in all files
LINES = [
    ([("human", "<image>\nWhich plane is shown?"), ("gpt", "Axial.")], ["ct/lung.png"], {}),
    ([("human", "<image><image> Same window?"), ("gpt", "No: lung, then bone.")], ["ct/lung.png", "ct/bone.png"],
     {"id": "case-7", "source": "pacs"}),
    ([("human", "<image> Plane?"), ("bot", "Axial.")], ["ct/lung.png"], {}),                      # message_role
    ([("human", "<image> Plane?"), ("gpt", "Axial.")], ["ct/missing.png"], {}),                   # image_missing
    ([("human", "<image><image> Plane?"), ("gpt", "Axial.")], ["ct/lung.png"], {}),               # image_tag_mismatch
    None,                                                                                          # json_invalid
    ([("human", "<image> Plane?")], ["ct/bone.png"], {}),                                          # field_missing
    ([("human", "<image> Window?"), ("gpt", "Bone window."), ("human", "Level?"), ("gpt", "About 400 HU.")],
     ["ct/bone.png"], {"split_hint": 1}),
]
EXPECTED_REJECTS = [(3, "message_role"), (4, "image_missing"), (5, "image_tag_mismatch"), (6, "json_invalid"),
                    (7, "field_missing")]
ROLES = {"openai": {"human": "user", "gpt": "assistant"}, "sharegpt": {}, "native": {}}


def _line(style: str, entry) -> str:
    if entry is None:
        return '{"not json'
    turns, images, extra = entry
    if style == "native":
        return json.dumps({"input_img": images, "message": [{"from": r, "value": v} for r, v in turns], **extra})
    if style == "sharegpt":
        return json.dumps({"conversations": [{"from": r, "value": v} for r, v in turns], "images": images, **extra})
    return json.dumps({"messages": [{"role": ROLES["openai"].get(r, r), "content": v} for r, v in turns],
                       "images": images, **extra})


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapped")
    (root / "images" / "ct").mkdir(parents=True)
    shutil.copy(CT / "ct_small_lung.png", root / "images" / "ct" / "lung.png")
    shutil.copy(CT / "ct_small_bone.png", root / "images" / "ct" / "bone.png")
    for style in ("native", "sharegpt", "openai"):
        (root / f"{style}.jsonl").write_text("".join(_line(style, e) + "\n" for e in LINES))
    (root / "catalog.yaml").write_text("""\
output_dir: shards
datasets:
  - {name: native, task: sft, jsonl_path: native.jsonl, data_dir: images, max_reject_fraction: 1.0}
  - name: sharegpt
    task: sft
    jsonl_path: sharegpt.jsonl
    data_dir: images
    max_reject_fraction: 1.0
    columns: {messages: conversations, images: images}
  - name: openai
    task: sft
    jsonl_path: openai.jsonl
    data_dir: images
    max_reject_fraction: 1.0
    columns: {messages: messages, images: images}
    tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}
""")
    report = run_ingest(load_catalog(root / "catalog.yaml"), executor="local", progress=False, log=lambda m: None)
    assert [d.status for d in report.datasets] == ["built"] * 3
    return root / "shards"


def _rows(folder: Path) -> list[dict]:
    rows = pq.read_table(folder).to_pylist()
    for row in rows:
        assert row.pop("dataset") == folder.name
        assert row.pop("sample_id") == f"{folder.name}:{row['line_number']}"
    return rows


@pytest.mark.parametrize("style", ["sharegpt", "openai"])
def test_mapped_shards_equal_the_native_shards(ingested, style):
    native, mapped = _rows(ingested / "native"), _rows(ingested / style)
    assert [r["line_number"] for r in native] == [1, 2, 8]
    assert mapped == native
    assert json.loads(native[1]["extra"]) == {"id": "case-7", "source": "pacs"}   # unmapped fields kept
    assert [m["from"] for m in mapped[2]["messages"]] == ["human", "gpt", "human", "gpt"]


@pytest.mark.parametrize("style", ["native", "sharegpt", "openai"])
def test_bad_lines_are_rejected_for_the_same_reasons(ingested, style):
    rejects = pq.read_table(ingested / style / "_rejects.parquet").to_pylist()
    assert [(r["line_number"], r["reason"]) for r in rejects] == EXPECTED_REJECTS
    manifest = json.loads((ingested / style / "_manifest.json").read_text())
    assert manifest["rows_read"] == 8 and manifest["rows_written"] == 3 and manifest["rows_rejected"] == 5


def test_the_mapping_is_part_of_the_fingerprint(ingested):
    """Changing columns:/tags: rebuilds the dataset (its rows depend on them); the other datasets stay."""
    catalog = ingested.parent / "catalog.yaml"
    text = catalog.read_text()
    catalog.write_text(text.replace("assistant_tag: assistant}", "assistant_tag: assistant, system_tag: sys}"))
    try:
        report = run_ingest(load_catalog(catalog), executor="local", progress=False, log=lambda m: None)
        assert [d.status for d in report.datasets] == ["up to date", "up to date", "built"]
    finally:
        catalog.write_text(text)
