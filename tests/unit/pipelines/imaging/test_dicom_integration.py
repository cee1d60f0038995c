"""DICOM / NIfTI / unusual PNG modes through the shared seams: image_io.probe_image (what ingest calls)
and image_decode.load_image_rgb (what the trainer and the report call)."""
from __future__ import annotations

import io
import json
import os
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from PIL import Image
from pydicom.data import get_testdata_file

from datasets_catalog.records import REASONS
from pipelines.imaging import decode as image_decode
from pipelines.imaging import probe as image_io
from pipelines.imaging.medical_hooks import options_from_meta, register_medical_imaging

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _registered():
    register_medical_imaging()


def _copy(tmp_path, name: str, target: str | None = None):
    dst = tmp_path / (target or name)
    shutil.copy(get_testdata_file(name), dst)
    return dst


def test_probe_dicom_stores_png_and_safe_meta(tmp_path):
    path = _copy(tmp_path, "CT_small.dcm", "scan.dcm")
    probe = image_io.probe_image(path, 10_000_000, {"window": "lung"})
    assert (probe.width, probe.height, probe.format) == (128, 128, "DICOM")
    assert probe.data.startswith(b"\x89PNG") and probe.frames is None
    assert probe.meta["window"]["source"] == "lung"
    assert b"CompressedSamples" not in probe.data and "CompressedSamples" not in json.dumps(probe.meta)


def test_probe_expands_frames_and_slices(tmp_path):
    us = _copy(tmp_path, "examples_ybr_color.dcm", "cine")  # no extension: sniffed by the DICM preamble
    probe = image_io.probe_image(us, 10_000_000, {"frame": "every 10"})
    assert [f.meta["frame_id"] for f in probe.frames] == ["f0", "f10", "f20"]
    nii = tmp_path / "brain.nii"
    shutil.copy(os.path.join(data_path, "anatomical.nii"), nii)
    vol = image_io.probe_image(nii, 10_000_000, {"slices": "every 12", "slice_axis": "axial"})
    assert vol.format == "NIFTI" and [f.meta["slice"] for f in vol.frames] == [0, 12, 24]
    single = image_io.probe_image(nii, 10_000_000, {"dicom": {"frame": "all"}})  # DICOM-only section
    assert single.frames is None and single.meta["slice"] == 12


def test_probe_reasons_are_registered_codes(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    path = tmp_path / "burned.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(image_io.ImageError) as err:
        image_io.probe_image(path, 10_000_000, {})
    assert err.value.reason == "dicom_burned_in_annotation" and err.value.reason in REASONS
    assert image_io.probe_image(path, 10_000_000, {"allow_burned_in_annotation": True}).width == 128
    with pytest.raises(image_io.ImageError) as err:
        image_io.probe_image(path, 100, {"allow_burned_in": True})
    assert err.value.reason == "image_too_large"


def test_probe_converts_16bit_png_and_records_it(tmp_path):
    path = tmp_path / "xr16.png"
    Image.fromarray(np.array([[0, 4095], [1000, 2000]], dtype=np.uint16)).save(path)
    probe = image_io.probe_image(path, 10_000_000, {})
    assert probe.format == "PNG" and "min-max" in probe.meta["conversion"]
    assert Image.open(io.BytesIO(probe.data)).mode == "L"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (3, 3)).save(plain)
    assert image_io.probe_image(plain, 10_000_000, {}).meta is None  # plain images are untouched


def test_reader_decodes_referenced_dicom_as_ingest_did(tmp_path):
    path = _copy(tmp_path, "MR_small.dcm", "mr.dcm")
    probe = image_io.probe_image(path, 10_000_000, {"window": "brain"})
    stored = np.asarray(Image.open(io.BytesIO(probe.data)).convert("RGB"))
    referenced = np.asarray(image_decode.load_image_rgb(None, path, json.dumps(probe.meta)))
    assert np.array_equal(stored, referenced)
    assert options_from_meta(probe.meta).window.describe() == "brain"


def test_reader_scales_16bit_png_instead_of_clipping(tmp_path):
    path = _copy(tmp_path, "MR_small.dcm", "mr.dcm")
    probe16 = image_io.probe_image(path, 10_000_000, {"keep_16bit": True})
    probe8 = image_io.probe_image(path, 10_000_000, {})
    rgb = np.asarray(image_decode.load_image_rgb(probe16.data, None)).astype(int)
    assert np.abs(rgb[..., 0] - np.asarray(Image.open(io.BytesIO(probe8.data))).astype(int)).max() <= 1
