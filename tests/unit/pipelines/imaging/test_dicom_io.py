"""DICOM display pipeline on pydicom's own bundled test files, checked against pydicom's reference
functions (apply_modality_lut / apply_voi_lut / apply_color_lut / pixel_array)."""
from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from pipelines.imaging.medical import (
    DICOM_BURNED_IN, DICOM_DECODE_FAILED, DICOM_DECODER_MISSING, IMAGE_TOO_LARGE, MedicalImageError,
    MedicalOptions, is_medical,
)
from pipelines.imaging.dicom import decode_dicom
from pipelines.imaging.medical_hooks import decode_medical

warnings.filterwarnings("ignore", category=UserWarning)


def _bytes(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def _ds(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _reference_8bit(ds: pydicom.Dataset) -> np.ndarray:
    """Display values computed with pydicom's own LUT functions, normalised by the output range pydicom
    itself reports for the most extreme inputs."""
    values = apply_modality_lut(ds.pixel_array, ds)
    shown = apply_voi_lut(values, copy.deepcopy(ds))
    lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), copy.deepcopy(ds))
    return np.rint((shown - lo) / (hi - lo) * 255.0)


def test_sniffing_by_preamble_and_extension():
    assert is_medical(_bytes("CT_small.dcm")[:512], "x.bin")
    assert is_medical(b"\x00" * 16, "scan.DCM")
    assert not is_medical(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "x.png")


def test_mr_file_window_matches_pydicom_reference():
    ds = _ds("MR_small.dcm")
    [img] = decode_medical(_bytes("MR_small.dcm"), "MR_small.dcm")
    assert (img.width, img.height, img.mode, img.format) == (64, 64, "L", "DICOM")
    assert img.meta["window"]["source"] == "file"
    assert img.meta["window"]["center"] == float(ds.WindowCenter)
    got = _pixels(img.png).astype(int)
    ref = _reference_8bit(ds)
    assert np.abs(got - ref).max() <= 1
    assert got.max() - got.min() > 150  # a real window, not a flat image


@pytest.mark.parametrize("preset,center,width", [("lung", -600, 1500), ("bone", 400, 1800), ("brain", 40, 80)])
def test_ct_presets_match_pydicom_window(preset, center, width):
    ds = _ds("CT_small.dcm")
    [img] = decode_medical(_bytes("CT_small.dcm"), None, MedicalOptions.from_mapping({"window": preset}))
    assert img.meta["window"] == {"source": preset, "center": center, "width": width, "function": "LINEAR",
                                  "inverted": False}
    ref_ds = copy.deepcopy(ds)
    ref_ds.WindowCenter, ref_ds.WindowWidth = center, width
    assert np.abs(_pixels(img.png).astype(int) - _reference_8bit(ref_ds)).max() <= 1
    # rescale intercept -1024 was applied: a lung window sees HU, not stored values
    assert img.meta["rescale"]["intercept"] == -1024.0


def test_ct_without_window_uses_minmax_and_records_it():
    [img] = decode_medical(_bytes("CT_small.dcm"), None)
    ds = _ds("CT_small.dcm")
    hu = apply_modality_lut(ds.pixel_array, ds)
    w = img.meta["window"]
    assert w["source"] == "minmax"
    assert w["center"] == pytest.approx((hu.min() + hu.max()) / 2)
    px = _pixels(img.png)
    assert px.min() == 0 and px.max() == 255


def _monochrome1_phantom() -> bytes:
    """A CR-like MONOCHROME1 image: the left half is air (high stored values = displayed black)."""
    ds = _ds("MR_small.dcm")
    arr = np.full((64, 64), 200, dtype=np.int16)
    arr[:, :32] = 3000
    ds.PixelData = arr.tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 1600, 3200
    return _save(ds)


def test_monochrome1_is_inverted_so_air_is_dark():
    [img] = decode_medical(_monochrome1_phantom(), None)
    px = _pixels(img.png).astype(int)
    assert img.meta["window"]["inverted"] is True
    assert px[:, :32].mean() < 40 < 200 < px[:, 32:].mean()


def test_monochrome1_equals_inverted_monochrome2():
    ds = _ds("MR_small.dcm")
    [mono2] = decode_medical(_save(ds), None)
    ds.PhotometricInterpretation = "MONOCHROME1"
    [mono1] = decode_medical(_save(ds), None)
    diff = _pixels(mono1.png).astype(int) - (255 - _pixels(mono2.png).astype(int))
    assert np.abs(diff).max() <= 1
    assert mono1.sha256 == mono2.sha256  # same stored pixels: same content hash


@pytest.mark.parametrize("keep_16bit, air, tissue", [
    # DICOM PS3.3 C.11.2.1.2 LINEAR, c = 1600, w = 3200, by hand: y = ((x - 1599.5) / 3199 + 0.5) * max.
    # air x = 3000: 0.937793 * max; tissue x = 200: 0.062520 * max; MONOCHROME1 shows max - y.
    # 8-bit: 255 - 239.14 = 15.86 -> 16 and 255 - 15.94 = 239.06 -> 239.
    (False, 16, 239),
    # 16-bit: 65535 - 61458.3 = 4076.7 -> 4077 and 65535 - 4097.2 = 61437.8 -> 61438.
    (True, 4077, 61438),
])
def test_monochrome1_inverts_within_the_output_range(keep_16bit, air, tissue):
    options = MedicalOptions.from_mapping({"keep_16bit": keep_16bit})
    [img] = decode_medical(_monochrome1_phantom(), None, options)
    px = _pixels(img.png).astype(int)
    assert img.meta["window"]["inverted"] is True
    assert np.unique(px[:, :32]).tolist() == [air] and np.unique(px[:, 32:]).tolist() == [tissue]


def test_keep_16bit_outputs_16bit_png():
    [img] = decode_medical(_bytes("MR_small.dcm"), None, MedicalOptions.from_mapping({"keep_16bit": True}))
    assert img.mode == "I;16"
    px = _pixels(img.png).astype(int)
    assert px.max() > 255
    ref = _reference_8bit(_ds("MR_small.dcm"))
    assert np.abs(px / 65535.0 * 255.0 - ref).max() <= 1.0


def test_multiframe_ultrasound_frame_rules():
    name = "examples_ybr_color.dcm"  # US, 30 frames, YBR_FULL_422, JPEG baseline
    ds = _ds(name)
    reference = ds.pixel_array  # pydicom converts YBR to RGB by default
    [middle] = decode_medical(_bytes(name), name)
    assert (middle.width, middle.height, middle.mode) == (320, 240, "RGB")
    assert middle.meta["frame"] == 15 and middle.meta["num_frames"] == 30 and middle.suffix is None
    assert middle.meta["photometric_interpretation"] == "YBR_FULL_422"
    assert np.array_equal(_pixels(middle.png), reference[15])
    [first] = decode_medical(_bytes(name), name, MedicalOptions.from_mapping({"frame": "first"}))
    assert np.array_equal(_pixels(first.png), reference[0])
    frames = decode_medical(_bytes(name), name, MedicalOptions.from_mapping({"frame": "all"}))
    assert [f.suffix for f in frames] == [f"f{i}" for i in range(30)]
    assert [f.index for f in frames] == list(range(30))
    assert np.array_equal(_pixels(frames[29].png), reference[29])


def test_frame_index_out_of_range_is_a_reason():
    with pytest.raises(MedicalImageError) as err:
        decode_medical(_bytes("rtdose.dcm"), None, MedicalOptions.from_mapping({"frame": [40]}))
    assert err.value.reason == "frame_out_of_range"


def test_palette_colour_to_rgb():
    ds = _ds("examples_palette.dcm")
    [img] = decode_medical(_bytes("examples_palette.dcm"), None)
    assert img.mode == "RGB" and (img.width, img.height) == (800, 350)
    ref = apply_color_lut(ds.pixel_array, ds) >> 8  # 16-bit LUT entries -> high byte
    assert np.array_equal(_pixels(img.png), ref.astype(np.uint8))


def test_ybr_uncompressed_to_rgb():
    ds = _ds("SC_ybr_full_422_uncompressed.dcm")
    [img] = decode_medical(_bytes("SC_ybr_full_422_uncompressed.dcm"), None)
    assert img.mode == "RGB" and img.meta["color"] == "YBR_FULL_422->RGB"
    assert np.array_equal(_pixels(img.png), ds.pixel_array)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_lossless_syntaxes_decode_identically(name):
    [plain] = decode_medical(_bytes("MR_small.dcm"), None)
    [other] = decode_medical(_bytes(name), None)
    assert np.array_equal(_pixels(other.png), _pixels(plain.png))
    assert other.sha256 == plain.sha256
    assert other.meta["transfer_syntax"] == _ds(name).file_meta.TransferSyntaxUID.name


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPGExtended.dcm"])
def test_lossy_and_lossless_jpeg_families_decode(name):
    ds = _ds(name)
    [img] = decode_medical(_bytes(name), None)
    assert (img.width, img.height) == (int(ds.Columns), int(ds.Rows))


def test_missing_decoder_gives_clear_reason(monkeypatch):
    from pydicom.pixels import get_decoder

    data = _bytes("MR_small_jpeg_ls_lossless.dcm")
    decoder = get_decoder(_ds("MR_small_jpeg_ls_lossless.dcm").file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})  # as on a machine without pylibjpeg / gdcm
    with pytest.raises(MedicalImageError) as err:
        decode_medical(data, None)
    assert err.value.reason == DICOM_DECODER_MISSING
    assert "JPEG-LS" in err.value.detail and "pip install" in err.value.detail


def test_undecodable_pixels_give_clear_reason():
    with pytest.raises(MedicalImageError) as err:
        decode_medical(_bytes("JPEG-lossy.dcm"), None)  # needs GDCM; no installed plugin decodes it
    assert err.value.reason == DICOM_DECODE_FAILED
    assert "JPEG Extended" in err.value.detail


def test_burned_in_annotation_rejected_unless_allowed():
    ds = _ds("CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    data = _save(ds)
    with pytest.raises(MedicalImageError) as err:
        decode_medical(data, None)
    assert err.value.reason == DICOM_BURNED_IN and "allow_burned_in" in err.value.detail
    [img] = decode_medical(data, None, MedicalOptions.from_mapping({"allow_burned_in": True}))
    assert img.width == 128


def test_pixel_cap_checked_before_decoding():
    with pytest.raises(MedicalImageError) as err:
        decode_dicom(_bytes("CT_small.dcm"), MedicalOptions(max_pixels=100 * 100))
    assert err.value.reason == IMAGE_TOO_LARGE


def test_metadata_has_no_identifiers_and_allow_list_adds_tags():
    ds = _ds("CT_small.dcm")
    name, pid, inst = str(ds.PatientName), str(ds.PatientID), str(ds.get("InstitutionName", "")) or None
    [img] = decode_medical(_bytes("CT_small.dcm"), None)
    text = json.dumps(img.meta)
    for secret in filter(None, [name, pid, inst]):
        assert secret not in text and secret.encode() not in img.png
    assert {"modality", "photometric_interpretation", "bits_stored", "pixel_spacing", "window"} <= set(img.meta)
    [kept] = decode_medical(_bytes("CT_small.dcm"), None,
                            MedicalOptions.from_mapping({"keep_dicom_tags": ["Manufacturer", "KVP"]}))
    assert kept.meta["dicom_tags"] == {"Manufacturer": str(ds.Manufacturer), "KVP": float(ds.KVP)}


@pytest.mark.parametrize("tags,hint", [(["NotAKeyword"], "not a DICOM keyword"),
                                       (["ReferencedImageSequence"], "sequence")])
def test_allow_list_is_validated(tags, hint):
    with pytest.raises(ValueError, match=hint):
        MedicalOptions.from_mapping({"keep_dicom_tags": tags})


def test_missing_decoder_message_is_exact(monkeypatch):
    from pydicom.pixels import get_decoder

    ds = _ds("MR_small_jpeg_ls_lossless.dcm")
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(MedicalImageError) as err:
        decode_medical(_bytes("MR_small_jpeg_ls_lossless.dcm"), None)
    missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
    assert err.value.detail == (f"pixel data is {ds.file_meta.TransferSyntaxUID.name}; install a decoder for it "
                                f"({missing}), e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")


def test_undecodable_pixels_name_the_other_decoders():
    from pydicom.pixels import get_decoder

    ds = _ds("JPEG-lossy.dcm")
    missing = "; ".join(get_decoder(ds.file_meta.TransferSyntaxUID).missing_dependencies)
    with pytest.raises(MedicalImageError) as err:
        decode_medical(_bytes("JPEG-lossy.dcm"), None)
    assert missing and err.value.detail.endswith(f"; another decoder may read it ({missing})")
