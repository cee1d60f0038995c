"""NIfTI decoding rules against hand-written expectations: the recorded metadata, the window of every kind, the
8- and 16-bit display values, the content hash and every reject with its reason and message.

The phantom is small enough to do by hand: a 4x3x2 float32 volume (x, y, z), RAS affine with voxel sizes
2 x 3 x 4 mm. Slice z=1 (the "middle" rule: 2 // 2) holds S[i, j] = (i + j) % 5, slice z=0 is all zero,
so the volume spans 0..4.
"""
from __future__ import annotations

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from pipelines.imaging.medical import MedicalImageError, MedicalOptions
from pipelines.imaging.nifti import decode_nifti

# S[i, j] = (i + j) % 5 with i = x (0..3), j = y (0..2), written out
S = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0]], dtype=np.float32)
# Radiological display of S: rows = y from anterior (j=2) to posterior, columns = x from right (i=3) to left,
# i.e. D[r, c] = S[3 - c, 2 - r], by hand:
D = np.array([[0, 4, 3, 2], [4, 3, 2, 1], [3, 2, 1, 0]])
# A LINEAR_EXACT window with centre 2, width 4 (and the DICOM LINEAR window 2.5 / 5, whose c - 0.5 = 2 and
# w - 1 = 4 are the same) maps x to ((x - 2) / 4 + 0.5) * max: fractions 0, .25, .5, .75, 1, rounded half
# to even: 8 bit 0, 63.75 -> 64, 127.5 -> 128, 191.25 -> 191, 255; 16 bit 0, 16383.75 -> 16384,
# 32767.5 -> 32768, 49151.25 -> 49151, 65535.
LEVELS_8 = {0: 0, 1: 64, 2: 128, 3: 191, 4: 255}
LEVELS_16 = {0: 0, 1: 16384, 2: 32768, 3: 49151, 4: 65535}
AFFINE = np.diag([2.0, 3.0, 4.0, 1.0])
ORIENTATION = "radiological (closest canonical RAS, no resampling)"


def _volume() -> np.ndarray:
    vol = np.zeros((4, 3, 2), dtype=np.float32)
    vol[:, :, 1] = S
    return vol


def _bytes(data: np.ndarray, affine: np.ndarray = AFFINE, cal: tuple[float, float] | None = None) -> bytes:
    img = nib.Nifti1Image(data, affine)
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    return img.to_bytes()


def _decode(data: bytes, **options) -> list:
    return decode_nifti(data, MedicalOptions.from_mapping(options))


def _grey(img) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(img.png))).astype(int)


def _hash(raw: np.ndarray) -> str:
    """The documented content hash, written from its rule: sha256 of "shape|<f8|" and the float64 samples."""
    a = np.ascontiguousarray(raw, dtype="<f8")
    return hashlib.sha256(f"{a.shape}|<f8|".encode() + a.tobytes()).hexdigest()


def _meta(window: dict, **extra) -> dict:
    return {"source_format": "NIFTI", "nifti_version": 1, "source_axcodes": "RAS", "orientation": ORIENTATION,
            "plane": "axial", "num_slices": 2, "pixel_spacing": [3.0, 2.0], "slice_spacing": 4.0,
            "datatype": "float32", "window": window, "slice": 1, **extra}


MINMAX = {"source": "minmax", "center": 2.0, "width": 4.0, "function": "LINEAR_EXACT", "scope": "volume"}


@pytest.mark.parametrize("keep_16bit, levels, mode", [(False, LEVELS_8, "L"), (True, LEVELS_16, "I;16")])
def test_minmax_window_metadata_pixels_and_hash(keep_16bit, levels, mode):
    [img] = _decode(_bytes(_volume()), window="minmax", keep_16bit=keep_16bit)
    assert img.meta == _meta(MINMAX, output_mode=mode)
    assert (img.format, img.mode, img.width, img.height, img.index, img.suffix) == ("NIFTI", mode, 4, 3, 1, None)
    assert _grey(img).tolist() == [[levels[v] for v in row] for row in D.tolist()]
    assert img.sha256 == _hash(S)


@pytest.mark.parametrize("window, source", [("2.5/5", "catalog"), ({"center": 2.5, "width": 5}, "catalog")])
@pytest.mark.parametrize("keep_16bit, levels", [(False, LEVELS_8), (True, LEVELS_16)])
def test_fixed_window_is_the_dicom_linear_rule(window, source, keep_16bit, levels):
    [img] = _decode(_bytes(_volume()), window=window, keep_16bit=keep_16bit)
    assert img.meta["window"] == {"source": source, "center": 2.5, "width": 5.0, "function": "LINEAR"}
    assert _grey(img).tolist() == [[levels[v] for v in row] for row in D.tolist()]


def test_preset_window_records_its_name():
    # brain = 40 / 80: LINEAR c = 39.5, w = 79, x -> ((x - 39.5) / 79 + 0.5) * 255 = x * 255 / 79 above
    # c - w/2 = 0: 1 -> 3.23, 2 -> 6.46, 3 -> 9.68, 4 -> 12.91, rounded 3, 6, 10, 13
    [img] = _decode(_bytes(_volume()), window="brain")
    assert img.meta["window"] == {"source": "brain", "center": 40.0, "width": 80.0, "function": "LINEAR"}
    levels = {0: 0, 1: 3, 2: 6, 3: 10, 4: 13}
    assert _grey(img).tolist() == [[levels[v] for v in row] for row in D.tolist()]


@pytest.mark.parametrize("cal, levels", [
    ((0.0, 4.0), LEVELS_8),                          # centre 2, width 4: as the min-max window
    # centre 0, width 8: fractions (x + 4) / 8 -> 0.5, .625, .75, .875, 1 -> 127.5 -> 128, 159.375 -> 159,
    # 191.25 -> 191, 223.125 -> 223, 255
    ((-4.0, 4.0), {0: 128, 1: 159, 2: 191, 3: 223, 4: 255}),
])
def test_auto_window_uses_the_file_calibration_range(cal, levels):
    [img] = _decode(_bytes(_volume(), cal=cal))
    c, w = (cal[0] + cal[1]) / 2, cal[1] - cal[0]
    assert img.meta["window"] == {"source": "file_cal_range", "center": c, "width": w, "function": "LINEAR_EXACT",
                                  "scope": "volume"}
    assert _grey(img).tolist() == [[levels[v] for v in row] for row in D.tolist()]


def test_percentile_windows_use_numpys_linear_rule():
    # 100 values 0..99: the p-th percentile sits at index p / 100 * 99 (linear interpolation), i.e. the value itself
    vol = np.arange(100, dtype=np.float32).reshape(4, 5, 5)
    [pct] = _decode(_bytes(vol), window="percentile:10,90")       # 9.9 .. 89.1
    assert pct.meta["window"]["source"] == "percentile:10,90"
    assert pct.meta["window"]["center"] == pytest.approx(49.5) and pct.meta["window"]["width"] == pytest.approx(79.2)
    [auto] = _decode(_bytes(vol))                                   # no calibration range: 0.5 .. 99.5 -> 0.495 .. 98.505
    assert set(auto.meta["window"]) == {"source", "center", "width", "function", "scope"}
    assert auto.meta["window"]["source"] == "percentile:0.5,99.5"
    assert auto.meta["window"]["center"] == pytest.approx(49.5) and auto.meta["window"]["width"] == pytest.approx(98.01)


def test_two_dimensional_file_is_one_slice():
    [img] = _decode(_bytes(S, np.diag([2.0, 3.0, 1.0, 1.0])), window="minmax")
    assert img.meta["num_slices"] == 1 and img.meta["slice"] == 0 and img.meta["slice_spacing"] == 1.0
    assert img.meta["pixel_spacing"] == [3.0, 2.0]
    assert _grey(img).tolist() == [[LEVELS_8[v] for v in row] for row in D.tolist()]
    assert img.sha256 == _hash(S)


def test_four_dimensional_volume_choice_and_bounds():
    vol4 = np.zeros((4, 3, 2, 3), dtype=np.int16)
    vol4[:, :, 1, 2] = S.astype(np.int16)
    data = _bytes(vol4)
    [img] = _decode(data, volume=2, window="minmax")
    assert img.meta["volume"] == 2 and img.meta["num_volumes"] == 3 and img.meta["datatype"] == "int16"
    assert _grey(img).tolist() == [[LEVELS_8[v] for v in row] for row in D.tolist()]
    assert img.sha256 == _hash(S)                       # int16 samples hashed as float64, as in 3-D files
    with pytest.raises(MedicalImageError) as err:
        _decode(data, volume=3)                         # volumes 0..2: 3 is the first out of range
    assert str(err.value) == "frame_out_of_range: volume 3 requested but the file has 3"
    [one] = _decode(_bytes(np.zeros((4, 3, 2, 1), dtype=np.float32)))   # a single volume is fine
    assert one.meta["num_volumes"] == 1


@pytest.mark.parametrize("shape", [(2, 2, 2, 1, 2), (2, 2, 2, 0)])
def test_unsupported_shapes_are_a_reason(shape):
    with pytest.raises(MedicalImageError) as err:
        _decode(_bytes(np.zeros(shape, dtype=np.float32), np.eye(4)))
    assert str(err.value) == f"nifti_unsupported: volumes of shape {shape} are not supported (at most 4-D)"


def test_pixel_cap_is_per_slice_and_inclusive():
    data = _bytes(_volume())
    [img] = decode_nifti(data, MedicalOptions.from_mapping({}, max_pixels=12))   # 4 x 3 = 12 pixels: at the cap
    assert img.width * img.height == 12
    with pytest.raises(MedicalImageError) as err:
        decode_nifti(data, MedicalOptions.from_mapping({}, max_pixels=11))
    assert str(err.value) == "image_too_large: 4x3 slices are over the cap of 11 pixels"


def test_broken_files_name_what_is_wrong():
    full = _bytes(np.zeros((10, 10, 10), dtype=np.float32), np.eye(4))
    cases = [
        (full[:347], "nifti_invalid", "file is shorter than a NIfTI header"),
        (full[:348], "nifti_invalid", "could not read the voxel data ("),     # a whole header, no voxels
        (b"\x00" * 400, "nifti_invalid", "not a readable single-file NIfTI (HeaderDataError: "),
        (gzip.compress(full)[:30], "nifti_invalid", "corrupt gzip stream ("),
    ]
    for data, reason, start in cases:
        with pytest.raises(MedicalImageError) as err:
            decode_nifti(data)
        assert err.value.reason == reason and err.value.detail.startswith(start), err.value
        assert str(err.value) == f"{reason}: {err.value.detail}"
    assert str(err.value) != ""
    with pytest.raises(MedicalImageError) as err:
        decode_nifti(full[:347])
    assert err.value.detail == "file is shorter than a NIfTI header"


def test_slice_out_of_range_names_the_rule():
    with pytest.raises(MedicalImageError) as err:
        _decode(_bytes(_volume()), slices=[5])
    assert err.value.reason == "frame_out_of_range" and err.value.detail.startswith("slice rule ")
    assert "5" in err.value.detail
