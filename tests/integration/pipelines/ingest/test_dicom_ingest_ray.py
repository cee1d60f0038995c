"""The shipped DICOM and NIfTI example datasets through jobs/ingest.py on real Ray Data: frame and slice
expansion ids, safe metadata, --keep-dicom-tags, --reference-images read back by the trainer's decoder,
and catalog option errors."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.imaging.decode import load_image_rgb

ROOT = Path(__file__).resolve().parents[4]
MEDICAL = ("ct_chest_lung", "mr_echo_dicom", "brain_mr_axial")


def _ingest(*args: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ingest_job", ROOT / "jobs" / "ingest.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main([str(ROOT / "catalog" / "radiology.yaml"), "--only", ",".join(MEDICAL), "--quiet", *args])


def test_shipped_medical_datasets_through_ray(ray_cluster, tmp_path, capsys):
    assert _ingest("--out", str(tmp_path / "emb"), "--keep-dicom-tags", "Manufacturer") == 0
    summary = capsys.readouterr().out
    assert all(name in summary for name in MEDICAL)
    ids = {name: list(pd.read_parquet(tmp_path / "emb" / name)["sample_id"]) for name in MEDICAL}
    assert ids["ct_chest_lung"] == ["ct_chest_lung:1", "ct_chest_lung:2"]
    assert ids["mr_echo_dicom"] == ["mr_echo_dicom:1", "mr_echo_dicom:2", "mr_echo_dicom:3:f0", "mr_echo_dicom:3:f10",
                                  "mr_echo_dicom:3:f20"]
    assert ids["brain_mr_axial"] == [f"brain_mr_axial:1:s{k}" for k in (0, 6, 12, 18, 24)]
    rows = pd.read_parquet(tmp_path / "emb" / "mr_echo_dicom")
    metas = [json.loads(r["input_images"][0]["meta"]) for _, r in rows.iterrows()]
    assert metas[1]["photometric_interpretation"] == "MONOCHROME1" and metas[1]["window"]["inverted"] is True
    assert metas[0]["transfer_syntax"].startswith("JPEG 2000")
    assert metas[2]["dicom_tags"] == {"Manufacturer": "SonoSite, Inc."} and metas[2]["frame"] == 0
    # the MONOCHROME1 copy displays like the original MR (inversion is right)
    mr = [np.asarray(Image.open(io.BytesIO(r["input_images"][0]["bytes"]))).astype(int) for _, r in rows.iloc[:2].iterrows()]
    assert np.abs(mr[0] - mr[1]).max() <= 1

    # --reference-images: same process_chunk without Ray (the Ray path is covered above)
    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest

    catalog = load_catalog(ROOT / "catalog" / "radiology.yaml")
    assert run_ingest(catalog, out=tmp_path / "ref", only=list(MEDICAL), reference_images=True, executor="local",
                      progress=False, log=lambda m: None).ok
    data_dir = ROOT / "examples" / "radiology"
    for name, folder in (("mr_echo_dicom", "dicom"), ("brain_mr_axial", "nifti")):
        emb = pd.read_parquet(tmp_path / "emb" / name)
        ref = pd.read_parquet(tmp_path / "ref" / name)
        for (_, a), (_, b) in zip(emb.iterrows(), ref.iterrows()):
            ia, ib = a["input_images"][0], b["input_images"][0]
            assert ib["bytes"] is None and ia["sha256"] == ib["sha256"]
            stored = np.asarray(load_image_rgb(ia["bytes"], None))
            again = np.asarray(load_image_rgb(None, data_dir / folder / ib["path"], ib["meta"]))
            assert np.array_equal(stored, again), b["sample_id"]


def test_catalog_option_errors_are_one_clear_message(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ingest_job", ROOT / "jobs" / "ingest.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "data").mkdir()
    bad = "datasets:\n  - name: d\n    task: sft\n    jsonl_path: d.jsonl\n    data_dir: data\n    window: lungs\n"
    (tmp_path / "c.yaml").write_text(bad)
    assert job.main([str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "line 6" in err and "'window'" in err and "lung" in err and "Traceback" not in err
    (tmp_path / "c.yaml").write_text(bad.replace("window: lungs", "frame: every 0"))
    assert job.main([str(tmp_path / "c.yaml")]) == 2
    assert "'frame'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(bad.replace("    window: lungs\n", ""))
    assert job.main([str(tmp_path / "c.yaml"), "--keep-dicom-tags", "PatientNam"]) == 2
    assert "not a DICOM keyword" in capsys.readouterr().err
