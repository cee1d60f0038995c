"""Acceptance: a catalog with a train and a val dataset sharing two images (one PNG copied under another
name, one CT scan re-exported as RLE-compressed DICOM with another patient header) is ingested; the ingest
summary warns, and `jobs/report.py --strict` exits non-zero naming both rows of each pair. The page is
rendered by headless Chromium when it is installed."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from datasets_catalog.catalog import load_catalog
from pipelines.ingest.driver import format_summary, run_ingest
from pipelines.report.ingest_checks import register_ingest_checks

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = Path(__file__).resolve().parents[4]


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)


def _line(path: str, answer: str) -> str:
    return json.dumps({"input_img": [{"path": path}], "message": [
        {"from": "human", "value": "<image>\nFindings?"}, {"from": "gpt", "value": answer}]})


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("leaky")
    train, val = root / "train_imgs", root / "val_imgs"
    train.mkdir()
    val.mkdir()
    for i in range(3):
        _png(train / f"t{i}.png", i)
    _png(val / "v0.png", 10)
    shutil.copy(train / "t1.png", val / "copy_of_t1.png")                    # shared image 1: same bytes
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(train / "ct.dcm", enforce_file_format=True)
    ds.PatientName, ds.PatientID = "Other^Name", "X-1"                       # shared image 2: same pixels,
    ds.compress(RLELossless)                                                # new header and compression
    ds.save_as(val / "ct_reexport.dcm", enforce_file_format=True)
    (root / "train.jsonl").write_text("\n".join([_line("t0.png", "a"), _line("t1.png", "b"), _line("t2.png", "c"),
                                                 _line("ct.dcm", "d")]) + "\n")
    (root / "val.jsonl").write_text("\n".join([_line("v0.png", "e"), _line("copy_of_t1.png", "f"),
                                               _line("ct_reexport.dcm", "g")]) + "\n")
    (root / "c.yaml").write_text(
        "output_dir: shards\ndatasets:\n"
        "  - {name: cxr_train, task: sft, jsonl_path: train.jsonl, data_dir: train_imgs, split: train}\n"
        "  - {name: cxr_val, task: sft, jsonl_path: val.jsonl, data_dir: val_imgs, split: val}\n")
    register_ingest_checks()   # what jobs/ingest.py does at start-up
    report = run_ingest(load_catalog(root / "c.yaml"), executor="local", progress=False, log=lambda m: None)
    assert report.ok
    summary = format_summary(report)
    assert "train/val leakage" in summary
    assert "cxr_train:2" in summary and "cxr_val:2" in summary and "cxr_train:4" in summary and "cxr_val:3" in summary
    return root / "shards"


def test_report_strict_names_both_rows_of_each_leak(leaky, tmp_path):
    out = tmp_path / "report.html"
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(leaky), "--out", str(out), "--strict",
                          "--thumbnails", "1"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 1, run.stdout + run.stderr
    leaks = [line for line in run.stdout.splitlines() if line.startswith("LEAKAGE:")]
    assert len(leaks) == 2
    assert any("cxr_train:2" in line and "copy_of_t1.png" in line and "cxr_val:2" in line for line in leaks)
    assert any("cxr_train:4" in line and "ct_reexport.dcm" in line and "cxr_val:3" in line for line in leaks)
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') >= 9 and "cxr_val:3" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(leaky, tmp_path):
    from pipelines.report.quality import write_report

    out = tmp_path / "r.html"
    write_report(leaky, out, thumbnails=2)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"))
    assert pixels.shape == (2400, 1200)
    # rendered plots and thumbnails: large areas that are neither white nor text-sparse
    assert (pixels < 128).mean() > 0.01 and len(np.unique(pixels)) > 64
