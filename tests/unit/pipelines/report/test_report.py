"""Quality report: duplicates and train/val leakage on real Parquet shards, the CLI's --strict exit code,
and an HTML page whose every plot is an embedded PNG."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.report.quality import build_report, leakage_warnings, render_html, scan_shards
from pipelines.storage.shard_schema import REJECTS_SCHEMA, SHARD_SCHEMA

ROOT = Path(__file__).resolve().parents[4]


def _png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image(path: str, data: bytes, meta: dict | None = None) -> dict:
    img = Image.open(io.BytesIO(data))
    return {"path": path, "width": img.width, "height": img.height, "format": "PNG", "vae_width": 512,
            "vae_height": 384, "vae_tokens": 768, "vit_width": 378, "vit_height": 280, "vit_tokens": 540,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": data, "meta": json.dumps(meta) if meta else None}


def write_dataset(root: Path, name: str, split: str, images: list[tuple[str, bytes]], rejects=(),
                  modality: str = "xray") -> None:
    folder = root / name
    folder.mkdir(parents=True)
    rows = [{"sample_id": f"{name}:{i + 1}", "dataset": name, "task": "sft", "line_number": i + 1,
             "messages": [{"from": "human", "value": "<image>\nFindings?"}, {"from": "gpt", "value": "word " * (i + 2)}],
             "input_images": [_image(path, data, {"modality": "CR"} if i == 0 else None)], "output_images": [],
             "text_tokens": 10 + i, "num_tokens": 800 + i, "extra": "{}"} for i, (path, data) in enumerate(images)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), folder / "part-00000.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist([{"line_number": 100 + k, "reason": r, "detail": "d", "raw": "{}"}
                                         for k, r in enumerate(rejects)], schema=REJECTS_SCHEMA),
                   folder / "_rejects.parquet")
    manifest = {"dataset": name, "task": "sft", "split": split, "modality": modality, "rows_written": len(rows),
                "rows_rejected": len(rejects), "rows_read": len(rows) + len(rejects)}
    (folder / "_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def leaky_shards(tmp_path: Path) -> Path:
    a, b, c, d, e, f = (_png(s) for s in range(6))
    shards = tmp_path / "shards"
    write_dataset(shards, "chest_train", "train", [("a.png", a), ("b.png", b), ("c.png", c), ("d.png", d), ("d2.png", d)],
                  rejects=["image_missing", "image_missing", "json_invalid"])
    write_dataset(shards, "chest_val", "val", [("x/a.png", a), ("e.png", e), ("x/b.png", b)])
    write_dataset(shards, "other_train", "train", [("c_copy.png", c), ("f.png", f)], modality="ct")
    return shards


def test_duplicates_and_leakage_found_leakage_first(leaky_shards):
    report = build_report(leaky_shards, thumbnails=0)
    kinds = [g.kind for g in report.duplicates]
    assert kinds == ["leakage", "leakage", "cross_dataset", "within_dataset"]
    pairs = {(p.train.sample_id, p.eval.sample_id) for p in report.leakage}
    assert pairs == {("chest_train:1", "chest_val:1"), ("chest_train:2", "chest_val:3")}
    assert report.scan.datasets["chest_train"].rejects == {"image_missing": 2, "json_invalid": 1}
    assert report.scan.datasets["chest_train"].image_modalities == {"CR": 1}


def test_scan_never_reads_image_bytes(leaky_shards, monkeypatch):
    seen: list[str] = []
    original = pq.ParquetFile.read

    def spy(self, columns=None, **kw):
        seen.extend(columns or ["<all>"])
        return original(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    scan = scan_shards(leaky_shards)
    assert sum(s.rows for s in scan.datasets.values()) == 10
    assert seen and "<all>" not in seen
    assert not any(c.endswith(".bytes") for c in seen)
    assert any(c.startswith("input_images.") and c.endswith(".sha256") for c in seen)


def test_leakage_warnings_for_the_ingest_summary(leaky_shards, tmp_path):
    lines = leakage_warnings(leaky_shards)
    assert "2 image(s)" in lines[0] and "2 row pair(s)" in lines[0]
    assert any("train chest_train:1 " in line and "chest_val:1 (val)" in line for line in lines)
    assert any("train chest_train:2 " in line and "chest_val:3 (val)" in line for line in lines)
    assert leakage_warnings(tmp_path / "nowhere") == []


def test_cli_strict_exits_nonzero_naming_both_rows(leaky_shards, tmp_path, capsys):
    """In-process main() (the real subprocess run is in test_report_ingest.py)."""
    out = tmp_path / "r.html"
    job = _load_job()
    assert job.main([str(leaky_shards), "--out", str(out), "--strict", "--thumbnails", "2"]) == 1
    captured = capsys.readouterr()
    leak_lines = [line for line in captured.out.splitlines() if line.startswith("LEAKAGE")]
    assert len(leak_lines) == 2
    assert any("chest_train:1" in line and "chest_val:1" in line for line in leak_lines)
    assert any("chest_train:2" in line and "chest_val:3" in line for line in leak_lines)
    assert "leakage" in captured.err and out.is_file()
    assert job.main([str(leaky_shards), "--out", str(out), "--json", "--thumbnails", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["duplicate_groups"] == {"leakage": 2, "cross_dataset": 1, "within_dataset": 1}
    assert job.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def _load_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_job", ROOT / "jobs" / "report.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def test_html_is_self_contained_with_embedded_png_plots(leaky_shards):
    report = build_report(leaky_shards, thumbnails=3, seed=1)
    page = render_html(report)
    parser = _Images()
    parser.feed(page)
    plots = [i for i in parser.imgs if i.get("class") == "plot"]
    thumbs = [i for i in parser.imgs if i.get("class") == "thumbimg"]
    assert len(plots) == 9 and len(thumbs) == 3 + 3 + 2  # other_train has two rows
    assert not parser.links
    for img in parser.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        png.verify()
    assert page.index("Train/validation leakage") < page.index("other group")
    assert "chest_train:1" in page and "chest_val:1" in page
    # thumbnails are seeded: the same seed draws the same rows
    again = build_report(leaky_shards, thumbnails=3, seed=1)
    assert [t.sample_id for t in again.thumbnails["chest_val"]] == [t.sample_id for t in report.thumbnails["chest_val"]]
