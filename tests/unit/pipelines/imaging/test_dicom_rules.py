"""DICOM display rules against hand-written expectations on a phantom built here: the window of every source
(catalog, preset, percentile, the file's window / VOI LUT / function, min-max), the recorded metadata, colour
scaling, frames, and every reject with its reason and message.

The phantom is 4 columns x 3 rows, 12 bits stored in 16, MONOCHROME2. Its stored values are 100 * D + 1000
(D below, 0..4) with rescale slope 2 and intercept -2000, so the modality values are 200 * D: 0..800.
"""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pipelines.imaging.dicom import decode_dicom
from pipelines.imaging.medical import MedicalImageError, MedicalOptions

D = np.array([[0, 4, 3, 2], [4, 3, 2, 1], [3, 2, 1, 0]])
# A window that maps the modality range 0..800 linearly onto 0..max (LINEAR_EXACT centre 400 width 800, or
# DICOM LINEAR 400.5 / 801: c - 0.5 = 400, w - 1 = 800) gives the fractions 0, .25, .5, .75, 1 for D = 0..4,
# rounded half to even: 8 bit 63.75 -> 64, 127.5 -> 128, 191.25 -> 191; 16 bit 16383.75 -> 16384,
# 32767.5 -> 32768, 49151.25 -> 49151.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # pydicom warns on the lower-case "yes" tested here
LEVELS_8 = {0: 0, 1: 64, 2: 128, 3: 191, 4: 255}
LEVELS_16 = {0: 0, 1: 16384, 2: 32768, 3: 49151, 4: 65535}
STORED = (D * 100 + 1000).astype(np.uint16)


def _phantom(stored: np.ndarray = STORED, meta_syntax: str | None = ExplicitVRLittleEndian,
             size: tuple[int, int] = (3, 4), **attrs) -> bytes:
    """A DICOM file of `size` (rows, columns) holding `stored` as its pixel data; `attrs` set or override."""
    fm = FileMetaDataset()
    if meta_syntax is not None:
        fm.TransferSyntaxUID = meta_syntax
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Rows, ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=meta_syntax is not None)
    return buf.getvalue()


def _ct(**attrs) -> bytes:
    return _phantom(RescaleSlope=2, RescaleIntercept=-2000, **attrs)


def _decode(data: bytes, **options):
    return decode_dicom(data, MedicalOptions.from_mapping(options))


def _grey(img) -> list[list[int]]:
    return np.asarray(Image.open(io.BytesIO(img.png))).astype(int).tolist()


def _levels(levels: dict[int, int]) -> list[list[int]]:
    return [[levels[v] for v in row] for row in D.tolist()]


def _error(data: bytes, **options) -> MedicalImageError:
    with pytest.raises(MedicalImageError) as err:
        _decode(data, **options)
    return err.value


@pytest.mark.parametrize("keep_16bit, levels, mode", [(False, LEVELS_8, "L"), (True, LEVELS_16, "I;16")])
def test_minmax_window_metadata_and_pixels(keep_16bit, levels, mode):
    [img] = _decode(_ct(), keep_16bit=keep_16bit)
    assert img.meta == {
        "source_format": "DICOM", "photometric_interpretation": "MONOCHROME2", "bits_stored": 12,
        "bits_allocated": 16, "pixel_representation": 0,
        "rescale": {"slope": 2.0, "intercept": -2000.0, "type": None},
        "transfer_syntax": "Explicit VR Little Endian",
        "window": {"source": "minmax", "center": 400.0, "width": 800.0, "function": "LINEAR_EXACT",
                   "inverted": False},
        "output_mode": mode,
    }
    assert (img.format, img.mode, img.width, img.height, img.index, img.suffix) == ("DICOM", mode, 4, 3, None, None)
    assert _grey(img) == _levels(levels)
    # the content hash is of the stored samples (uint16), written from its rule
    expected = hashlib.sha256(b"(3, 4)|<u2|" + STORED.astype("<u2").tobytes()).hexdigest()
    assert img.sha256 == expected


@pytest.mark.parametrize("keep_16bit, levels", [(False, LEVELS_8), (True, LEVELS_16)])
def test_catalog_window_is_the_linear_rule(keep_16bit, levels):
    [img] = _decode(_ct(), window="400.5/801", keep_16bit=keep_16bit)
    assert img.meta["window"] == {"source": "catalog", "center": 400.5, "width": 801.0, "function": "LINEAR",
                                  "inverted": False}
    assert _grey(img) == _levels(levels)


def test_preset_window_records_its_name():
    # bone = 400 / 1800: LINEAR c = 399.5, w = 1799: y = ((x - 399.5) / 1799 + 0.5) * 255 for x = 200 * D:
    # 0 -> 70.87, 200 -> 99.22, 400 -> 127.57, 600 -> 155.92, 800 -> 184.27
    [img] = _decode(_ct(), window="bone")
    assert img.meta["window"] == {"source": "bone", "center": 400.0, "width": 1800.0, "function": "LINEAR",
                                  "inverted": False}
    assert _grey(img) == _levels({0: 71, 1: 99, 2: 128, 3: 156, 4: 184})


def test_percentile_window_of_the_modality_values():
    # 12 values 200 * sorted(D) = 0,0,200,200,400,400,400,600,600,600,800,800; numpy's linear rule puts
    # the 25th percentile at index 2.75 (200) and the 75th at 8.25 (600): centre 400, width 400, LINEAR_EXACT;
    # x <= 200 -> 0, x = 400 -> 127.5 -> 128, x = 600 -> 255, x > 600 -> 255
    [img] = _decode(_ct(), window="percentile:25,75")
    assert img.meta["window"] == {"source": "percentile:25,75", "center": 400.0, "width": 400.0,
                                  "function": "LINEAR_EXACT", "inverted": False}
    assert _grey(img) == _levels({0: 0, 1: 0, 2: 128, 3: 255, 4: 255})


@pytest.mark.parametrize("center, width", [(400.5, 801), ([400.5, 40], [801, 80])])   # several: the first
def test_the_files_window(center, width):
    [img] = _decode(_ct(WindowCenter=center, WindowWidth=width))
    assert img.meta["window"] == {"source": "file", "center": 400.5, "width": 801.0, "function": "LINEAR",
                                  "inverted": False}
    assert _grey(img) == _levels(LEVELS_8)


def test_the_files_sigmoid_function():
    # PS3.3 C.11.2.1.3.1: y = 255 / (1 + exp(-4 (x - c) / w)), c = 400, w = 800, x = 200 * D
    [img] = _decode(_ct(WindowCenter=400, WindowWidth=800, VOILUTFunction="SIGMOID"))
    assert img.meta["window"] == {"source": "file", "center": 400.0, "width": 800.0, "function": "SIGMOID",
                                  "inverted": False}
    levels = {d: round(255 / (1 + math.exp(-4 * (200 * d - 400) / 800))) for d in range(5)}
    assert levels == {0: 30, 1: 69, 2: 128, 3: 186, 4: 225}   # 30.40, 68.58, 127.5, 186.42, 224.60
    assert _grey(img) == _levels(levels)


def test_an_unusable_file_window_is_a_reason():
    err = _error(_ct(WindowCenter=400, WindowWidth=0.5))
    assert str(err) == "dicom_unsupported_pixels: the file's window is unusable: LINEAR window width must be >= 1"


def test_a_catalog_window_overrides_the_files():
    [img] = _decode(_ct(WindowCenter=40, WindowWidth=80), window="minmax")
    assert img.meta["window"]["source"] == "minmax"


@pytest.mark.parametrize("explanation, recorded", [("TEST LUT", "TEST LUT"), (None, None)])
@pytest.mark.parametrize("with_window", [False, True])   # a file with both: the LUT wins
def test_the_files_voi_lut(explanation, recorded, with_window):
    # stored values D (no rescale), a 10-bit LUT of 5 entries from input 0: D -> LUT[D] * 255 / 1023:
    # 0, 100 -> 24.93, 200 -> 49.85, 1023 -> 255, 1000 -> 249.27 (/ 1022 would give 249.51 -> 250)
    item = Dataset()
    item.LUTDescriptor = [5, 0, 10]
    item.LUTData = np.array([0, 100, 200, 1023, 1000], dtype="<u2").tobytes()   # OW: 16-bit words
    if explanation:
        item.LUTExplanation = explanation
    window = {"WindowCenter": 2, "WindowWidth": 2} if with_window else {}
    [img] = _decode(_phantom(D.astype(np.uint16), VOILUTSequence=[item], **window))
    assert img.meta["window"] == {"source": "file_voi_lut", "lut_bits": 10, "explanation": recorded,
                                  "inverted": False}
    assert _grey(img) == _levels({0: 0, 1: 25, 2: 50, 3: 255, 4: 249})


def test_an_empty_voi_lut_function_is_linear():
    [img] = _decode(_ct(WindowCenter=400.5, WindowWidth=801, VOILUTFunction=""))
    assert img.meta["window"]["function"] == "LINEAR"
    assert _grey(img) == _levels(LEVELS_8)


def test_metadata_fields_and_their_json_types():
    [img] = _decode(_ct(Modality="CT", BodyPartExamined="CHEST", ViewPosition="AP", SliceThickness="2.5",
                        ImagerPixelSpacing=[0.5, 0.75], RescaleType="HU", ImageType=["ORIGINAL", "PRIMARY"],
                        KVP="120", InstanceNumber="7", Manufacturer=""),
                    keep_dicom_tags=["ImageType", "KVP", "InstanceNumber", "Manufacturer", "StudyDate"])
    meta = dict(img.meta)
    assert meta.pop("window")["source"] == "minmax"
    assert meta == {
        "source_format": "DICOM", "modality": "CT", "body_part": "CHEST", "photometric_interpretation": "MONOCHROME2",
        "bits_stored": 12, "bits_allocated": 16, "pixel_representation": 0, "view_position": "AP",
        "slice_thickness": 2.5, "pixel_spacing": [0.5, 0.75],
        "rescale": {"slope": 2.0, "intercept": -2000.0, "type": "HU"},
        "transfer_syntax": "Explicit VR Little Endian",
        # DS "120" -> 120.0, IS "7" -> 7; an empty value stays empty; a tag the file lacks is left out
        "dicom_tags": {"ImageType": ["ORIGINAL", "PRIMARY"], "KVP": 120.0, "InstanceNumber": 7, "Manufacturer": ""},
        "output_mode": "L",
    }


def test_rescale_with_only_a_slope_and_pixel_spacing_first():
    [img] = _decode(_phantom(RescaleSlope=1, PixelSpacing=[0.25, 0.5], ImagerPixelSpacing=[9, 9]))
    assert img.meta["rescale"] == {"slope": 1.0, "intercept": 0.0, "type": None}
    assert img.meta["pixel_spacing"] == [0.25, 0.5]
    [plain] = _decode(_phantom(RescaleIntercept=-1000))
    assert plain.meta["rescale"] == {"slope": 1.0, "intercept": -1000.0, "type": None}
    [none] = _decode(_phantom())
    assert "rescale" not in none.meta and "pixel_spacing" not in none.meta and "dicom_tags" not in none.meta


def test_monochrome1_16bit_inverts_the_minmax_window():
    [img] = _decode(_ct(PhotometricInterpretation="MONOCHROME1"), keep_16bit=True)
    assert img.meta["window"]["inverted"] is True
    # inverted before rounding: 65535 - 16383.75 = 49151.25 -> 49151, 65535 - 32767.5 = 32767.5 -> 32768 (even)
    assert _grey(img) == _levels({0: 65535, 1: 49151, 2: 32768, 3: 16384, 4: 0})


def test_frames_of_a_multiframe_file():
    frames = np.stack([STORED, STORED + 100, STORED + 200])        # 3 frames
    data = _phantom(frames, NumberOfFrames=3)
    [middle] = _decode(data)
    assert (middle.index, middle.suffix, middle.meta["frame"], middle.meta["num_frames"]) == (1, None, 1, 3)
    every = _decode(data, frame="all")
    assert [(f.index, f.suffix, f.meta["frame"]) for f in every] == [(0, "f0", 0), (1, "f1", 1), (2, "f2", 2)]
    [last] = _decode(data, frame=-1)
    assert last.index == 2
    err = _error(data, frame=3)
    assert err.reason == "frame_out_of_range" and err.detail.startswith("frame rule ")
    [single] = _decode(_phantom(), frame="all")                     # one frame: no suffix, no frame keys
    assert (single.index, single.suffix) == (None, None) and "frame" not in single.meta


def test_sixteen_bit_rgb_is_scaled_to_8_bit():
    # 16 bits stored: v * 255 / 65535, i.e. v / 257: 0 -> 0, 257 -> 1, 32896 -> 128, 65535 -> 255
    rgb = np.array([[[0, 257, 32896], [65535, 0, 257]]], dtype=np.uint16)       # 1 row, 2 columns
    data = _phantom(rgb, size=(1, 2), SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                    BitsStored=16, HighBit=15)
    [img] = _decode(data)
    assert img.mode == "RGB" and img.meta["color"] == "RGB (16-bit scaled to 8-bit)" and "note" not in img.meta
    assert np.asarray(Image.open(io.BytesIO(img.png))).tolist() == [[[0, 1, 128], [255, 0, 1]]]
    [kept] = _decode(data, keep_16bit=True)
    assert kept.mode == "RGB"
    assert kept.meta["note"] == "keep_16bit applies to greyscale only; colour is stored as 8-bit RGB"


def test_eight_bit_rgb_is_kept():
    rgb = np.array([[[0, 10, 20], [30, 40, 255]]], dtype=np.uint8)
    data = _phantom(rgb, size=(1, 2), SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                    BitsAllocated=8, BitsStored=8, HighBit=7)
    [img] = _decode(data)
    assert img.meta["color"] == "RGB"
    assert np.asarray(Image.open(io.BytesIO(img.png))).tolist() == rgb.tolist()


@pytest.mark.parametrize("attrs, message", [
    ({"PhotometricInterpretation": "HSV"}, "dicom_unsupported_pixels: photometric interpretation 'HSV' is not supported"),
    ({"BurnedInAnnotation": "yes"}, "dicom_burned_in_annotation: BurnedInAnnotation is YES: text (possibly patient "
                                    "details) is burned into the pixels; set allow_burned_in: true for this dataset "
                                    "only if you have checked the images"),
    ({"Rows": 0}, "dicom_invalid: the image is 4x0 pixels"),
    ({"Columns": 0}, "dicom_invalid: the image is 0x3 pixels"),
])
def test_rejects_name_their_reason(attrs, message):
    assert str(_error(_phantom(**attrs))) == message


def test_burned_in_allowed_and_no():
    [img] = _decode(_phantom(BurnedInAnnotation="YES"), allow_burned_in=True)
    assert img.width == 4
    [img] = _decode(_phantom(BurnedInAnnotation="NO"))
    assert img.width == 4


def test_missing_pixels_and_attributes():
    ds_bytes = _phantom()
    no_pixels = ds_bytes[:ds_bytes.rfind(b"\xe0\x7f\x10\x00")]          # cut at the (7FE0,0010) Pixel Data tag
    assert str(_error(no_pixels)) == ("dicom_no_pixels: the file has no pixel data (e.g. a report or structure set); "
                                      "only image DICOMs can be ingested")
    err = _error(_phantom(meta_syntax=None))
    assert str(err) == "dicom_invalid: the file meta has no Transfer Syntax UID; re-save the file with one"


def test_unknown_transfer_syntax_is_a_reason():
    err = _error(_phantom(meta_syntax="1.2.3.4.5"))
    assert err.reason == "dicom_unsupported_syntax" and "1.2.3.4.5" in err.detail


def test_pixel_cap_is_inclusive():
    [img] = decode_dicom(_phantom(), MedicalOptions.from_mapping({}, max_pixels=12))
    assert img.width * img.height == 12
    with pytest.raises(MedicalImageError) as err:
        decode_dicom(_phantom(), MedicalOptions.from_mapping({}, max_pixels=11))
    assert str(err.value) == "image_too_large: 4x3 = 12 pixels is over the cap of 11"


def test_palette_colour_keeps_the_high_byte_of_16_bit_entries():
    # indexes 0, 1, 2 through 16-bit LUTs; the high byte of each entry: 0x1234 -> 0x12 = 18, 0x8000 -> 128,
    # 0xFF00 / 0xFFFF -> 255, 0x0100 -> 1, 0x7F80 -> 127, 0x00FF -> 0
    luts = {"Red": [0x0000, 0x1234, 0xFF00], "Green": [0x00FF, 0x8000, 0xFFFF], "Blue": [0x0000, 0x0100, 0x7F80]}
    attrs = {}
    for name, entries in luts.items():
        attrs[f"{name}PaletteColorLookupTableDescriptor"] = [3, 0, 16]
        attrs[f"{name}PaletteColorLookupTableData"] = np.array(entries, dtype="<u2").tobytes()
    data = _phantom(np.array([[0, 1, 2]], dtype=np.uint8), size=(1, 3), PhotometricInterpretation="PALETTE COLOR",
                    BitsAllocated=8, BitsStored=8, HighBit=7, **attrs)
    [img] = _decode(data)
    assert img.mode == "RGB" and img.meta["color"] == "PALETTE COLOR->RGB (palette LUT)"
    assert np.asarray(Image.open(io.BytesIO(img.png))).tolist() == [[[0, 0, 0], [18, 128, 1], [255, 255, 127]]]


def test_kept_tags_keep_json_types():
    [img] = _decode(_ct(Modality="", KVP="120", InstanceNumber="7", StudyID="12", AccessionNumber="1.5",
                        StationName="3.0", SeriesDescription="12a", SliceLocation=None, ImageType=["A", "B"]),
                    keep_dicom_tags=["KVP", "InstanceNumber", "StudyID", "AccessionNumber", "StationName",
                                     "SeriesDescription", "SliceLocation", "ImageType"])
    tags = img.meta["dicom_tags"]
    # DS -> float, IS -> int; a number written in a text VR: whole without a point -> int, else float
    expected = {"KVP": 120.0, "InstanceNumber": 7, "StudyID": 12, "AccessionNumber": 1.5, "StationName": 3.0,
                "SeriesDescription": "12a", "SliceLocation": None, "ImageType": ["A", "B"]}
    assert tags == expected
    assert {k: type(v) for k, v in tags.items()} == {k: type(v) for k, v in expected.items()}
    assert "modality" not in img.meta                              # an empty value is left out


def test_a_decoder_failure_names_the_syntax_and_the_first_lines(monkeypatch):
    import pydicom.pixels

    def fails(message):
        def pixel_array(*args, **kwargs):
            raise ValueError(message)
        return pixel_array

    monkeypatch.setattr(pydicom.pixels, "pixel_array", fails("one\n\n two \nthree\nfour"))
    assert str(_error(_phantom())) == ("dicom_decode_failed: could not decode the pixel data (Explicit VR Little "
                                       "Endian): one; two; three")
    monkeypatch.setattr(pydicom.pixels, "pixel_array", fails("a" * 400))
    assert _error(_phantom()).detail == "could not decode the pixel data (Explicit VR Little Endian): " + "a" * 300


def test_an_unreadable_file_is_a_reason(monkeypatch):
    import pydicom
    from pydicom.errors import InvalidDicomError

    def dcmread(*args, **kwargs):
        raise InvalidDicomError("no preamble")

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    assert str(_error(b"DICM")) == "dicom_invalid: not a readable DICOM file (no preamble)"


def test_nine_bit_rgb_is_scaled_and_noted():
    # v * 255 / 511: 0 -> 0, 256 -> 127.75 -> 128, 511 -> 255
    rgb = np.array([[[0, 256, 511]]], dtype=np.uint16)
    [img] = _decode(_phantom(rgb, size=(1, 1), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                             PlanarConfiguration=0, BitsStored=9, HighBit=8))
    assert img.meta["color"] == "RGB (9-bit scaled to 8-bit)"
    assert np.asarray(Image.open(io.BytesIO(img.png))).tolist() == [[[0, 128, 255]]]


def _palette(bits: int, entries: dict[str, list[int]] | None) -> bytes:
    attrs = {}
    for name, values in (entries or {}).items():
        attrs[f"{name}PaletteColorLookupTableDescriptor"] = [len(values), 0, bits]
        attrs[f"{name}PaletteColorLookupTableData"] = np.array(values, dtype="u1" if bits == 8 else "<u2").tobytes()
    return _phantom(np.array([[0, 1, 2]], dtype=np.uint8), size=(1, 3), PhotometricInterpretation="PALETTE COLOR",
                    BitsAllocated=8, BitsStored=8, HighBit=7, **attrs)


def test_an_8_bit_palette_lut_decodes_or_is_a_reason():
    # three 8-bit entries are 3 bytes, padded to 4 in the file; pydicom 3 reads 4 * 8 / 3 bits per entry and
    # raises TypeError ('uint11'), which escaped as a traceback. Either the entries as they are (a pydicom that
    # reads them) or the clear reason, never a traceback.
    data = _palette(8, {"Red": [0, 18, 255], "Green": [0, 128, 255], "Blue": [0, 1, 127]})
    try:
        [img] = _decode(data)
    except MedicalImageError as err:
        assert str(err).startswith("dicom_unsupported_pixels: the PALETTE COLOR lookup table cannot be applied "
                                   "(descriptor [3, 0, 8]); convert the file to RGB (pydicom: ")
    else:
        assert np.asarray(Image.open(io.BytesIO(img.png))).tolist() == [[[0, 0, 0], [18, 128, 1], [255, 255, 127]]]


def test_a_palette_file_without_its_lut_is_a_reason():
    err = _error(_palette(8, None))
    assert err.reason == "dicom_unsupported_pixels"
    assert str(err).startswith("dicom_unsupported_pixels: the PALETTE COLOR lookup table cannot be applied "
                               "(no RedPaletteColorLookupTableDescriptor); convert the file to RGB (pydicom: ")


def _resaved(data: bytes, drop: tuple[str, ...] = (), **attrs) -> bytes:
    """`data` read back, with the `drop` elements deleted and `attrs` set, saved again."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in drop:
        delattr(ds, keyword)
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize("keyword, dtype", [("FloatPixelData", "<f4"), ("DoubleFloatPixelData", "<f8")])
def test_float_pixel_data_is_named_in_the_reject(keyword, dtype):
    data = _resaved(_phantom(), drop=("PixelData",), **{keyword: np.zeros(12, dtype=dtype).tobytes()})
    assert str(_error(data)) == ("dicom_no_pixels: the file has FloatPixelData (e.g. a report or structure set); "
                                 "only image DICOMs can be ingested")


def test_missing_rows_is_an_invalid_file():
    err = _error(_resaved(_phantom(), drop=("Rows",)))
    assert err.reason == "dicom_invalid" and err.detail.startswith("image attributes are missing or malformed (")


def test_two_frames_and_a_zero_frame_count():
    frames = np.stack([STORED, STORED + 100])                       # 2 frames: the middle rule picks 2 // 2 = 1
    data = _phantom(frames, NumberOfFrames=2)
    [middle] = _decode(data)
    assert (middle.index, middle.suffix, middle.meta["frame"], middle.meta["num_frames"]) == (1, None, 1, 2)
    every = _decode(data, frame="all")
    assert [(f.index, f.suffix, f.meta["frame"]) for f in every] == [(0, "f0", 0), (1, "f1", 1)]
    assert every[1].sha256 == middle.sha256 != every[0].sha256      # each frame its own stored pixels
    # NumberOfFrames 0 counts as one frame: no frame keys, the single frame's pixels
    [one] = _decode(_phantom(NumberOfFrames=0))
    assert (one.index, one.suffix) == (None, None) and "frame" not in one.meta
    assert _grey(one) == _levels(LEVELS_8)


def test_missing_decoder_plugins_are_listed(monkeypatch):
    import pydicom.pixels

    class Decoder:
        is_available = True   # the installed decoder fails; the other plugins it lists are missing
        missing_dependencies = ["plugin a needs x", "plugin b needs y"]

    def pixel_array(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", pixel_array)
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Decoder())
    assert _error(_phantom()).detail == ("could not decode the pixel data (Explicit VR Little Endian): boom; another "
                                         "decoder may read it (plugin a needs x; plugin b needs y)")
    Decoder.is_available = False   # no plugin at all: the decoder-missing reason lists the same two
    assert str(_error(_phantom())) == ("dicom_decoder_missing: pixel data is Explicit VR Little Endian; install a "
                                       "decoder for it (plugin a needs x; plugin b needs y), e.g. pip install "
                                       "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")


def test_a_palette_lut_error_names_its_type(monkeypatch):
    import pydicom.pixels

    def apply_color_lut(*args, **kwargs):
        raise TypeError("bad table")

    monkeypatch.setattr(pydicom.pixels, "apply_color_lut", apply_color_lut)
    data = _palette(8, {"Red": [0, 1], "Green": [0, 1], "Blue": [0, 1]})
    assert str(_error(data)) == ("dicom_unsupported_pixels: the PALETTE COLOR lookup table cannot be applied "
                                 "(descriptor [2, 0, 8]); convert the file to RGB (pydicom: TypeError: bad table)")
