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


# -- data-derived windows and rounding, by hand ---------------------------------------------------------------
def test_minmax_window_by_hand():
    from pipelines.imaging.pixel_modes import minmax_window

    assert minmax_window(np.array([10, 30, 20], dtype=np.int16)) == (20.0, 20.0)
    assert minmax_window(np.array([5.0, np.nan, np.inf, 7.0])) == (6.0, 2.0)          # non-finite ignored
    assert minmax_window(np.array([4.0])) == (4.0, 1.0)                                # flat: width 1
    assert minmax_window(np.array([3.0, 3.5])) == (3.25, 1.0)                          # width below 1 -> 1
    assert minmax_window(np.array([2.0, 3.0])) == (2.5, 1.0)
    assert minmax_window(np.array([1.0, 2.5])) == (1.75, 1.5)                          # 1.5 kept, not 2
    assert minmax_window(np.array([np.nan])) == (0.0, 1.0)                             # nothing finite
    assert minmax_window(np.array([], dtype=np.float64)) == (0.0, 1.0)
    # int32 extremes: the difference is taken in float64, never overflowing the integer type
    big = np.array([-2_000_000_000, 2_000_000_000], dtype=np.int32)
    assert minmax_window(big) == (0.0, 4_000_000_000.0)


def test_window_linear_exact_by_hand():
    from pipelines.imaging.pixel_modes import window_linear_exact

    # LINEAR_EXACT, c = 100, w = 200: y = ((x - 100) / 200 + 0.5) * 255; 0 at x <= 0, 255 above 200
    got = window_linear_exact(np.array([-10.0, 0.0, 50.0, 100.0, 200.0, 250.0]), 100.0, 200.0, 255)
    assert got.tolist() == pytest.approx([0.0, 0.0, 63.75, 127.5, 255.0, 255.0])
    with pytest.raises(ValueError, match="LINEAR_EXACT window width must be > 0"):
        window_linear_exact(np.array([1.0]), 0.0, 0.0, 255)


def test_to_display_rounds_and_clips_to_the_output_range():
    from pipelines.imaging.pixel_modes import to_display

    values = np.array([-3.0, np.nan, 0.5, 1.5, 254.6, 255.4, 300.0, 65535.4, 70000.0])
    eight = to_display(values, keep_16bit=False)
    assert eight.dtype == np.uint8
    assert eight.tolist() == [0, 0, 0, 2, 255, 255, 255, 255, 255]          # rint: 0.5 -> 0, 1.5 -> 2
    sixteen = to_display(values, keep_16bit=True)
    assert sixteen.dtype == np.uint16
    assert sixteen.tolist() == [0, 0, 0, 2, 255, 255, 300, 65535, 65535]


@pytest.mark.parametrize("mode, info, expected", [
    ("LA", {}, "LA->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("La", {}, "La->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("RGBA", {}, "RGBA->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("RGBa", {}, "RGBa->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("PA", {}, "PA->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("P", {"transparency": 0},
     "P with transparency->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("L", {"transparency": 0},
     "L with transparency->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("RGB", {"transparency": (0, 0, 0)},
     "RGB with transparency->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"),
    ("P", {}, "P->RGB (palette expanded at decode time)"),
    ("CMYK", {}, "CMYK->RGB (PIL's naive formula, no ICC profile, at decode time)"),
    ("YCbCr", {}, "YCbCr->RGB (at decode time)"),
])
def test_decode_time_conversions_are_described_exactly(mode, info, expected):
    from pipelines.imaging.pixel_modes import decode_time_conversion

    assert decode_time_conversion(mode, info) == ("RGB", expected)
