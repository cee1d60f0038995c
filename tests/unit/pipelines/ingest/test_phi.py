"""PHI stays out: a DICOM full of identifiers ingests, and none of them appears anywhere in the output
folder (shards, rejects, manifests, the quality report), neither in the raw bytes of any file nor in the
decompressed Parquet values; PNGs carry no text chunks. A positive control (an explicit allow-list) shows
the scan does find an identifier when one is kept on purpose."""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from datasets_catalog.catalog import load_catalog
from pipelines.ingest.driver import run_ingest
from pipelines.report.quality import write_report

warnings.filterwarnings("ignore", category=UserWarning)

PATIENT_NAME = "Doe^Jane^Quincy"
PATIENT_ID = "MRN-8675309"
SECRETS = [PATIENT_NAME, "Doe^Jane", "Quincy", PATIENT_ID, "8675309", "Saint Example General",
           "House^Gregory", "ACC-55501234", "19700101", "Jane Doe"]
PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf"}


def _phi_dicom(path: Path, burned_in: bool = False) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.OtherPatientIDs = "8675309"
    ds.InstitutionName = "Saint Example General Hospital"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.AccessionNumber = "ACC-55501234"
    ds.StudyDescription = "CT chest for Jane Doe"
    if burned_in:
        ds.BurnedInAnnotation = "YES"
    ds.save_as(path, enforce_file_format=True)


def _catalog(tmp_path: Path, keep: list[str] | None = None) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    _phi_dicom(data / "scan_0001.dcm")
    _phi_dicom(data / "scan_0002.dcm", burned_in=True)
    line = lambda p: json.dumps({"input_img": [{"path": p}], "message": [  # noqa: E731
        {"from": "human", "value": "<image>\nDescribe the slice."}, {"from": "gpt", "value": "An axial CT slice."}]})
    (tmp_path / "phi.jsonl").write_text(line("scan_0001.dcm") + "\n" + line("scan_0002.dcm") + "\n")
    extra = f", keep_dicom_tags: {json.dumps(keep)}" if keep else ""
    (tmp_path / "c.yaml").write_text(
        "output_dir: out\nmax_reject_fraction: 1.0\ndatasets:\n"
        f"  - {{name: phi_ct, task: sft, jsonl_path: phi.jsonl, data_dir: data, split: train, window: lung{extra}}}\n")
    return tmp_path / "c.yaml"


def _decompressed_text(path: Path) -> str:
    """Every value of a Parquet file, decompressed, as text (binary columns decoded leniently)."""
    rows = pq.read_table(path).to_pylist()
    return json.dumps(rows, default=lambda b: b.decode("latin-1") if isinstance(b, bytes) else str(b))


def _png_chunks(data: bytes) -> list[bytes]:
    pos, kinds = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


def _scan(out: Path) -> list[str]:
    found = []
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        raw = path.read_bytes()
        text = _decompressed_text(path) if path.suffix == ".parquet" else ""
        for secret in SECRETS:
            if secret.encode() in raw or secret.encode("utf-16-le") in raw or secret in text:
                found.append(f"{secret} in {path.relative_to(out)}")
    return found


def test_no_identifier_reaches_the_output_folder(tmp_path):
    report = run_ingest(load_catalog(_catalog(tmp_path)), executor="local", progress=False, log=lambda m: None)
    out = tmp_path / "out"
    ds = report.datasets[0]
    assert (ds.rows_written, ds.rows_rejected) == (1, 1)  # the burned-in copy is rejected, the other kept
    rejects = pq.read_table(out / "phi_ct" / "_rejects.parquet").to_pylist()
    assert rejects[0]["reason"] == "dicom_burned_in_annotation"
    shard = pq.read_table(out / "phi_ct").to_pylist()
    image = shard[0]["input_images"][0]
    assert image["format"] == "DICOM" and image["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert not set(_png_chunks(image["bytes"])) & PNG_TEXT_CHUNKS
    meta = json.loads(image["meta"])
    assert meta["modality"] == "CT" and meta["window"]["source"] == "lung"
    write_report(out, out / "report.html", thumbnails=4)
    assert _scan(out) == []


def test_scan_finds_an_identifier_that_is_allow_listed(tmp_path):
    """Positive control: keeping PatientID on purpose puts it in the shard, and the scan sees it."""
    run_ingest(load_catalog(_catalog(tmp_path, keep=["PatientID"])), executor="local", progress=False,
               log=lambda m: None)
    found = _scan(tmp_path / "out")
    assert any(PATIENT_ID in f for f in found) and not any(PATIENT_NAME in f for f in found)


@pytest.mark.parametrize("keep", [["PatientName"], ["InstitutionName", "StudyDescription"]])
def test_only_the_allow_listed_tags_are_kept(tmp_path, keep):
    run_ingest(load_catalog(_catalog(tmp_path, keep=keep)), executor="local", progress=False, log=lambda m: None)
    image = pq.read_table(tmp_path / "out" / "phi_ct").to_pylist()[0]["input_images"][0]
    assert sorted(json.loads(image["meta"])["dicom_tags"]) == sorted(keep)
