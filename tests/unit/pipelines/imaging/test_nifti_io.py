"""NIfTI slicing, windowing and radiological orientation on nibabel's bundled volumes and on phantoms."""
from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from PIL import Image

from pipelines.imaging.medical import MedicalImageError, MedicalOptions, is_medical
from pipelines.imaging.medical_hooks import decode_medical


def _file(name: str) -> bytes:
    with open(os.path.join(data_path, name), "rb") as f:
        return f.read()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, gz: bool = False) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def test_sniffing_nifti_plain_and_gzip():
    assert is_medical(_file("anatomical.nii")[:512], "a.bin")
    assert is_medical(_file("example4d.nii.gz")[:512], "a.bin")
    assert not is_medical(b"\x1f\x8b" + b"\x00" * 100, "a.bin")


def test_anatomical_middle_axial_slice_against_reference():
    img = nib.load(os.path.join(data_path, "anatomical.nii"))
    canonical = nib.as_closest_canonical(img)
    vol = canonical.get_fdata()
    [out] = decode_medical(_file("anatomical.nii"), "anatomical.nii")
    k = vol.shape[2] // 2
    assert out.meta["slice"] == k and out.meta["plane"] == "axial" and out.meta["num_slices"] == vol.shape[2]
    assert (out.width, out.height) == (vol.shape[0], vol.shape[1])
    assert out.meta["source_axcodes"] == "".join(nib.aff2axcodes(img.affine))
    lo, hi = np.percentile(vol, [0.5, 99.5])  # the documented default window for files without cal_min/max
    ref = np.rint(np.clip((vol[:, :, k].T[::-1, ::-1] - lo) / (hi - lo), 0, 1) * 255)
    assert np.abs(_pixels(out.png).astype(int) - ref).max() <= 1


@pytest.mark.parametrize("axcodes_affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-2.0, 2.0, 2.0, 1.0]),
                                            np.diag([-2.0, -2.0, 2.0, 1.0])])
def test_radiological_orientation_independent_of_storage(axcodes_affine):
    """A marker in the patient's right-anterior corner shows top-left (viewer's left = patient's right)."""
    shape = (6, 5, 4)
    data = np.zeros(shape, dtype=np.float32)
    # voxel index of the most Right (+x) and most Anterior (+y) voxel under this affine
    i = shape[0] - 1 if axcodes_affine[0, 0] > 0 else 0
    j = shape[1] - 1 if axcodes_affine[1, 1] > 0 else 0
    data[i, j, :] = 100.0
    data[0 if i else shape[0] - 1, 0 if j else shape[1] - 1, :] = 50.0  # left-posterior corner
    [out] = decode_medical(_nifti_bytes(data, axcodes_affine), "p.nii",
                           MedicalOptions.from_mapping({"window": "minmax"}))
    px = _pixels(out.png)
    assert px.shape == (5, 6)  # rows = A-P, columns = R-L
    assert px[0, 0] == 255 and px[-1, -1] == 128


def test_coronal_and_sagittal_put_superior_on_top():
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[:, :, -1] = 10.0  # most superior plane
    raw = _nifti_bytes(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    for axis in ("coronal", "sagittal"):
        [out] = decode_medical(raw, "p.nii", MedicalOptions.from_mapping({"axis": axis, "window": "minmax"}))
        px = _pixels(out.png)
        assert px.shape[0] == 6 and (px[0] == 255).all() and (px[1:] == 0).all(), axis


@pytest.mark.parametrize("rule,expected", [("all", list(range(25))), ("every 5", [0, 5, 10, 15, 20]),
                                           ("indices:1,-1", [1, 24]), ("first", [0]), ("middle", [12])])
def test_slice_rules(rule, expected):
    out = decode_medical(_file("anatomical.nii"), None, MedicalOptions.from_mapping({"slices": rule}))
    assert [o.index for o in out] == expected
    expands = rule not in ("first", "middle")
    assert [o.suffix for o in out] == ([f"s{k}" for k in expected] if expands else [None])


def test_slices_out_of_range_is_a_reason():
    with pytest.raises(MedicalImageError) as err:
        decode_medical(_file("anatomical.nii"), None, MedicalOptions.from_mapping({"slices": [99]}))
    assert err.value.reason == "frame_out_of_range"


def test_4d_gzip_and_nifti2_use_file_display_range():
    for name in ("example4d.nii.gz", "example_nifti2.nii.gz"):
        img = nib.load(os.path.join(data_path, name))
        [out] = decode_medical(_file(name), name)
        assert out.meta["window"]["source"] == "file_cal_range"
        assert out.meta["num_volumes"] == img.shape[3] and out.meta["volume"] == 0
        assert out.meta["nifti_version"] == (2 if "nifti2" in name else 1)
    with pytest.raises(MedicalImageError):
        decode_medical(_file("example4d.nii.gz"), None, MedicalOptions.from_mapping({"volume": 7}))


def test_percentile_and_preset_windows():
    data = np.linspace(-1000, 1000, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    raw = _nifti_bytes(data, np.eye(4))
    [pct] = decode_medical(raw, None, MedicalOptions.from_mapping({"window": "percentile:10,90"}))
    lo, hi = np.percentile(data, [10, 90])
    assert pct.meta["window"]["center"] == pytest.approx((lo + hi) / 2)
    [lung] = decode_medical(raw, None, MedicalOptions.from_mapping({"window": "lung", "keep_16bit": True}))
    assert lung.mode == "I;16" and lung.meta["window"]["source"] == "lung"


def test_corrupt_nifti_is_a_reason():
    data = _file("anatomical.nii")
    with pytest.raises(MedicalImageError) as err:
        decode_medical(data[:400], "broken.nii")
    assert err.value.reason == "nifti_invalid"
    with pytest.raises(MedicalImageError) as err:
        decode_medical(b"\x1f\x8b" + b"garbage" * 10, "broken.nii.gz")
    assert err.value.reason == "nifti_invalid"


def test_metadata_does_not_copy_header_text():
    img = nib.Nifti1Image(np.ones((4, 4, 2), dtype=np.int16), np.eye(4))
    img.header["descrip"] = b"Jane Doe 1970-01-01"
    img.header["db_name"] = b"MRN123456"
    [out] = decode_medical(img.to_bytes(), "p.nii")
    assert b"Jane" not in out.png and "Jane" not in str(out.meta) and "MRN123456" not in str(out.meta)
