"""Unusual PNG/TIFF modes, the windowing formula against pydicom, and the option parsers."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from pipelines.imaging.medical import IndexRule, MedicalOptions, parse_axis
from pipelines.imaging.pixel_modes import WINDOW_PRESETS, WindowSpec, apply_window, convert_unusual


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_plain_modes_are_left_alone():
    for mode in ("L", "RGB"):
        assert convert_unusual(_encode(Image.new(mode, (4, 3)))) is None


def test_16bit_png_minmax_to_8bit_and_kept_16bit():
    arr = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    data = _encode(Image.fromarray(arr))
    assert _open(data).mode.startswith("I")
    conv = convert_unusual(data)
    assert conv.mode == "L" and conv.meta["source_mode"] in ("I;16", "I")
    assert "min-max 1000..4000" in conv.meta["conversion"]
    assert np.array_equal(np.asarray(_open(conv.png)), [[0, 85], [170, 255]])
    kept = convert_unusual(data, keep_16bit=True)
    assert kept.mode == "I;16" and np.asarray(_open(kept.png)).max() == 65535


def _trainer_view(data: bytes) -> np.ndarray:
    from pipelines.imaging.decode import load_image_rgb  # what the trainer makes of the stored bytes

    return np.asarray(load_image_rgb(data, None))


def test_la_keeps_bytes_and_records_the_decode_time_conversion():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (200, 255))
    la.putpixel((1, 0), (200, 0))  # fully transparent
    data = _encode(la)
    conv = convert_unusual(data)
    assert conv.png is None and conv.mode == "RGB" and "over white" in conv.meta["conversion"]
    assert _trainer_view(data)[0].tolist() == [[200, 200, 200], [255, 255, 255]]  # what the record says
    direct, text = __import__("pipelines.imaging.pixel_modes", fromlist=["x"]).convert_pil_image(la)
    assert np.asarray(direct).ravel().tolist() == [200, 255] and "over white" in text


def test_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    data = _encode(p, transparency=1)
    conv = convert_unusual(data)
    assert conv.png is None and "P with transparency->RGB" in conv.meta["conversion"]
    assert _trainer_view(data).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_cmyk_tiff_and_multipage():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(cmyk, "TIFF")
    conv = convert_unusual(data)
    assert conv.meta["source_format"] == "TIFF" and conv.meta["conversion"].startswith("CMYK->RGB")
    assert tuple(_trainer_view(data)[0, 0]) == (255, 0, 0)
    pages = [Image.fromarray(np.full((2, 2), v, dtype=np.uint16)) for v in (10, 20)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    multi = convert_unusual(buf.getvalue())
    assert multi.meta["pages"] == 2 and multi.meta["page_used"] == 0 and multi.png is not None


def test_one_bit_is_recorded():
    data = _encode(Image.new("1", (3, 3), 1))
    conv = convert_unusual(data)
    assert conv.png is None and conv.meta["source_mode"] == "1"
    assert _trainer_view(data).min() == 255


def test_16bit_png_would_be_clipped_by_readers_without_the_rewrite():
    arr = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    data = _encode(Image.fromarray(arr))
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("L")) == 255).all()  # PIL alone: all white
    conv = convert_unusual(data)
    assert np.asarray(_open(conv.png)).tolist() == [[0, 85], [170, 255]]


def _ds(center: float, width: float, function: str) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 8, 0  # pydicom's output range is then 0..255
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    return ds


@settings(max_examples=60, deadline=None)
@given(center=st.floats(-2000, 2000), width=st.floats(1, 4000), function=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]),
       values=st.lists(st.floats(-5000, 5000), min_size=1, max_size=40))
def test_window_formula_matches_pydicom(center, width, function, values):
    x = np.array(values)
    ours = apply_window(x, center, width, function, out_max=255)
    with np.errstate(over="ignore"):  # pydicom's sigmoid overflows to the right limit too
        ref = apply_windowing(x.copy(), _ds(center, width, function))
    assert np.allclose(ours, ref, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.sampled_from(sorted(WINDOW_PRESETS) + ["auto", "minmax"]),
                 st.tuples(st.floats(0, 49), st.floats(51, 100)).map(lambda t: f"percentile:{t[0]:g},{t[1]:g}"),
                 st.tuples(st.integers(-1000, 1000), st.integers(1, 4000)).map(lambda t: f"{t[0]}/{t[1]}")))
def test_window_spec_round_trips(text):
    spec = WindowSpec.parse(text)
    assert WindowSpec.parse(spec.describe()) == spec


@pytest.mark.parametrize("bad", ["lungs", "percentile:90,10", "40/0", 12, {"center": 1}])
def test_window_spec_errors_are_helpful(bad):
    with pytest.raises(ValueError):
        WindowSpec.parse(bad)


@settings(max_examples=80, deadline=None)
@given(rule=st.one_of(st.sampled_from(["middle", "first", "last", "all"]),
                      st.integers(1, 7).map(lambda n: f"every {n}"),
                      st.lists(st.integers(-3, 3), min_size=1, max_size=4)),
       n=st.integers(4, 40))
def test_index_rules_select_valid_sorted_indices(rule, n):
    parsed = IndexRule.parse(rule)
    assert IndexRule.parse(parsed.describe()) == parsed
    picked = parsed.select(n)
    assert picked and all(0 <= i < n for i in picked)
    if parsed.kind != "indices":
        assert picked == sorted(set(picked))


def test_options_validation_names_the_key():
    with pytest.raises(ValueError, match="frame"):
        MedicalOptions.from_mapping({"frame": "sometimes"})
    with pytest.raises(ValueError, match="keep_16bit"):
        MedicalOptions.from_mapping({"keep_16bit": "yes"})
    with pytest.raises(ValueError, match="axis"):
        parse_axis("oblique")
    assert MedicalOptions.from_mapping({"slices": {"every": 3}, "axis": "coronal"}).slices.step == 3


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGB", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("1", "PNG"), ("I;16", "PNG"), ("L", "JPEG"), ("RGB", "JPEG"),
                                      ("CMYK", "JPEG"), ("RGB", "TIFF")])
def test_header_mode_check_agrees_with_pil(mode, fmt):
    from pipelines.imaging.pixel_modes import header_mode_is_plain

    img = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 999) if mode == "I;16" \
        else Image.new(mode, (8, 8))
    data = _encode(img, fmt)
    verdict = header_mode_is_plain(data)
    if fmt == "TIFF":
        assert verdict is None  # unknown from the header: the caller asks PIL
    else:
        assert verdict == (_open(data).mode in ("L", "RGB")), _open(data).mode
