"""Pixel helpers against hand-written expectations: window parsing and its messages, the window formulas at
their edges, bit-depth scaling, PNG encoding, the content hash, PIL mode conversions and the header-only
mode check. Complements test_pixel_modes.py (pydicom cross-checks and property tests)."""
from __future__ import annotations

import hashlib
import io
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.imaging.pixel_modes import (
    WINDOW_PRESETS, WindowSpec, apply_window, convert_pil_image, convert_unusual, encode_png, header_mode_is_plain,
    needs_conversion, percentile_window, pil_img2rgb, pixel_hash, scale_to_8bit,
)
from pipelines.imaging.probe import jpeg_sof_offset


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _px(img: Image.Image) -> list:
    return np.asarray(img).tolist()


def test_presets_are_the_usual_radiology_windows():
    assert WINDOW_PRESETS == {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "soft_tissue": (40.0, 400.0),
                              "abdomen": (40.0, 400.0), "liver": (60.0, 150.0), "bone": (400.0, 1800.0),
                              "brain": (40.0, 80.0), "subdural": (75.0, 215.0), "stroke": (40.0, 40.0)}


@pytest.mark.parametrize("value, expected, described", [
    (None, WindowSpec(), "auto"), ("auto", WindowSpec(), "auto"), (" File ", WindowSpec(), "auto"),
    ("", WindowSpec(), "auto"),
    ("MinMax", WindowSpec(kind="minmax"), "minmax"),
    ("Lung", WindowSpec(kind="preset", name="lung", center=-600.0, width=1500.0), "lung"),
    ("percentile:1,99", WindowSpec(kind="percentile", lo=1.0, hi=99.0), "percentile:1,99"),
    ("percentile 0.5 99.5", WindowSpec(kind="percentile", lo=0.5, hi=99.5), "percentile:0.5,99.5"),
    ("percentile=0,100", WindowSpec(kind="percentile", lo=0.0, hi=100.0), "percentile:0,100"),
    ("40/400", WindowSpec(kind="fixed", center=40.0, width=400.0), "40/400"),
    ("-600.5/1", WindowSpec(kind="fixed", center=-600.5, width=1.0), "-600.5/1"),
    ({"center": 40, "width": 400}, WindowSpec(kind="fixed", center=40.0, width=400.0), "40/400"),
])
def test_window_values_parse_and_describe(value, expected, described):
    spec = WindowSpec.parse(value)
    assert spec == expected and spec.describe() == described
    assert WindowSpec.parse(spec) is spec


@pytest.mark.parametrize("value, message", [
    (12, "window must be a string or a {center, width} mapping, got 12"),
    ({"center": 1, "level": 2, "width": 3}, "window mapping needs exactly 'center' and 'width', got ['center', 'level', 'width']"),
    ({"center": 1}, "window mapping needs exactly 'center' and 'width', got ['center']"),
    ({"width": 1}, "window mapping needs exactly 'center' and 'width', got ['width']"),
    ({"center": "x", "width": 1}, "window center/width must be numbers, got 'x'/1"),
    ({"center": 1, "width": None}, "window center/width must be numbers, got 1/None"),
    ("percentile:1", "window 'percentile:1': write percentile:LO,HI, e.g. percentile:1,99"),
    ("percentile:1,2,3", "window 'percentile:1,2,3': write percentile:LO,HI, e.g. percentile:1,99"),
    ("percentile:90,10", "window 'percentile:90,10': need 0 <= LO < HI <= 100"),
    ("percentile:5,5", "window 'percentile:5,5': need 0 <= LO < HI <= 100"),
    ("percentile:-1,50", "window 'percentile:-1,50': need 0 <= LO < HI <= 100"),
    ("percentile:0,100.5", "window 'percentile:0,100.5': need 0 <= LO < HI <= 100"),
    ("a/b", "window 'a/b': write CENTER/WIDTH, e.g. 40/400"),
    # a well-formed CENTER/WIDTH whose width is below 1 gets the precise message, not the "write" hint
    ("40/0.5", "window width must be a finite number >= 1, got 0.5"),
    ("40/0", "window width must be a finite number >= 1, got 0.0"),
    ("40/-400", "window width must be a finite number >= 1, got -400.0"),
    ("40/400/2", "window '40/400/2': write CENTER/WIDTH, e.g. 40/400"),
    ({"center": 40, "width": 0.5}, "window width must be a finite number >= 1, got 0.5"),
    ({"center": float("nan"), "width": 40}, "window width must be a finite number >= 1, got 40"),
    ({"center": 40, "width": float("inf")}, "window width must be a finite number >= 1, got inf"),
    ("lungs", "unknown window 'lungs'; use auto, minmax, percentile:LO,HI, CENTER/WIDTH or a preset: abdomen, "
              "bone, brain, liver, lung, mediastinum, soft_tissue, stroke, subdural"),
])
def test_bad_window_values_say_what_to_write(value, message):
    with pytest.raises(ValueError) as err:
        WindowSpec.parse(value)
    assert str(err.value) == message


def test_window_formula_edges():
    x = np.array([9.5, 9.6])
    # LINEAR of width 1 is a threshold at c - 0.5 = 9.5 (PS3.3 C.11.2.1.2.1: <= c - 0.5 -> min, else max)
    assert apply_window(x, 10.0, 1.0, "LINEAR", 65535).tolist() == [0.0, 65535.0]
    assert apply_window(x, 10.0, 1.0, None).tolist() == [0.0, 255.0]                 # no function: LINEAR
    assert apply_window(np.array([0.0, 2.0]), 1.5, 3.0, "linear").tolist() == [0.0, 255.0]   # c 1, w 2: 0 and 1
    # SIGMOID, c = 0, w = 4: 255 / (1 + exp(-x)); huge inputs reach the limits without an overflow warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = apply_window(np.array([0.0, -1e6, 1e6]), 0.0, 4.0, "sigmoid", 255)
    assert got.tolist() == [127.5, 0.0, 255.0]
    for function, width, message in [("SIGMOID", 0.0, "SIGMOID window width must be > 0"),
                                     ("LINEAR", 0.9, "LINEAR window width must be >= 1"),
                                     ("LINEAR_EXACT", 0.0, "LINEAR_EXACT window width must be > 0"),
                                     ("gamma", 10.0, "unsupported VOI LUT function 'GAMMA'")]:
        with pytest.raises(ValueError) as err:
            apply_window(x, 10.0, width, function)
        assert str(err.value) == message
    assert apply_window(np.array([1.0]), 1.0, 1e-9, "SIGMOID").tolist() == [127.5]    # any width > 0 is valid
    assert apply_window(np.array([1.0]), 1.0, 1e-9, "LINEAR_EXACT").tolist() == [127.5]


def test_percentile_window_by_hand():
    # numpy's linear rule on 0, 10: the 25th percentile is 2.5, the 75th 7.5
    assert percentile_window(np.array([10.0, np.nan, 0.0, np.inf]), 25, 75) == (5.0, 5.0)
    assert percentile_window(np.array([5.0, 5.5]), 0, 100) == (5.25, 1.0)                 # width at least 1
    assert percentile_window(np.array([1.0, 2.5]), 0, 100) == (1.75, 1.5)
    assert percentile_window(np.array([np.nan, -np.inf]), 1, 99) == (0.0, 1.0)            # nothing finite
    assert percentile_window(np.array([3, 7], dtype=np.int16), 0, 100) == (5.0, 4.0)


def test_scale_to_8bit_by_hand():
    eight = np.array([0, 7, 255], dtype=np.uint8)
    assert scale_to_8bit(eight, 8) is eight                                     # 8-bit already: untouched
    assert scale_to_8bit(eight, 7) is eight
    # 12 bits: v * 255 / 4095: 4095 -> 255, 2048 -> 127.53 -> 128, 8 -> 0.498 -> 0, 9 -> 0.56 -> 1
    got = scale_to_8bit(np.array([0, 8, 9, 2048, 4095], dtype=np.uint16), 12)
    assert got.dtype == np.uint8 and got.tolist() == [0, 0, 1, 128, 255]
    # a uint8 array that claims 9 bits (511 = full scale) is rescaled: 255 -> 127.25 -> 127
    assert scale_to_8bit(np.array([255], dtype=np.uint8), 9).tolist() == [127]


def _chunks(png: bytes) -> list[bytes]:
    names, at = [], 8
    while at < len(png):
        (length,) = np.frombuffer(png[at:at + 4], dtype=">u4")
        names.append(png[at + 4:at + 8])
        at += 12 + int(length)
    return names


def test_encode_png_modes_and_nothing_but_pixels():
    grey = np.array([[0, 255], [7, 8]], dtype=np.uint8)
    png, mode = encode_png(grey[:, ::-1])                         # a non-contiguous view is fine
    assert mode == "L" and _px(Image.open(io.BytesIO(png))) == [[255, 0], [8, 7]]
    assert _chunks(png) == [b"IHDR", b"IDAT", b"IEND"]
    png, mode = encode_png(np.array([[0, 65535]], dtype=np.uint16))
    assert mode == "I;16" and _px(Image.open(io.BytesIO(png))) == [[0, 65535]]
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)
    png, mode = encode_png(rgb)
    assert mode == "RGB" and _px(Image.open(io.BytesIO(png))) == rgb.tolist()
    # the default zlib level 6 (what the shards were written with): the IDAT stream says so in its header
    idat = png[png.index(b"IDAT") + 4:]
    assert zlib.decompressobj().decompress(idat[:2] + idat[2:]) is not None
    assert (idat[1] >> 6) == 2                                     # FLEVEL 2 = default compression (RFC 1950)
    for bad in (np.zeros((2, 2, 4), dtype=np.uint8), np.zeros((2, 2), dtype=np.float32),
                np.zeros((2, 2, 3), dtype=np.uint16), np.zeros(3, dtype=np.uint8)):
        with pytest.raises(ValueError) as err:
            encode_png(bad)
        assert str(err.value) == f"cannot encode array of shape {bad.shape} and dtype {bad.dtype} as PNG"


def test_pixel_hash_is_of_shape_dtype_and_little_endian_values():
    assert pixel_hash(np.array([[1, 2]], dtype=np.uint8)) == hashlib.sha256(b"(1, 2)||u1|\x01\x02").hexdigest()
    expected = hashlib.sha256(b"(2,)|<u2|\x01\x00\x02\x01").hexdigest()
    assert pixel_hash(np.array([1, 258], dtype="<u2")) == expected
    assert pixel_hash(np.array([1, 258], dtype=">u2")) == expected                  # byte order does not matter
    assert pixel_hash(np.array([[1, 3], [2, 4]], dtype="<u2").T) == \
        hashlib.sha256(b"(2, 2)|<u2|\x01\x00\x02\x00\x03\x00\x04\x00").hexdigest()    # row order of the view


def test_plain_and_one_bit_modes():
    for mode in ("L", "RGB"):
        img = Image.new(mode, (2, 1))
        assert convert_pil_image(img) == (img, None) and not needs_conversion(mode)
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    out, text = convert_pil_image(one)
    assert (out.mode, text, _px(out)) == ("L", "1->L", [[0, 255]])
    assert needs_conversion("1") and needs_conversion("LA") and needs_conversion("I;16")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_high_bit_depth_grey_is_stretched(mode):
    # values 10 / 20 / 25 / 30: min-max 10..30, LINEAR_EXACT c 20 w 20 -> 0, .5, .75, 1 -> 0, 127.5 -> 128,
    # 191.25 -> 191, 255; 16 bit: 0, 32767.5 -> 32768, 49151.25 -> 49151, 65535
    arr = np.array([[10, 20, 25, 30]], dtype=np.int32)
    img = Image.fromarray(arr).convert(mode) if mode != "I" else Image.fromarray(arr)
    out, text = convert_pil_image(img)
    assert (out.mode, text, _px(out)) == ("L", f"{mode}->L (min-max 10..30 stretched to 0..255)", [[0, 128, 191, 255]])
    out, text = convert_pil_image(img, keep_16bit=True)
    assert out.mode == "I;16" and text == f"{mode}->I;16 (min-max 10..30 stretched to 0..65535)"
    assert _px(out) == [[0, 32768, 49151, 65535]]


def test_float_images_become_8_bit_even_with_keep_16bit():
    # 0, 0.5, 1, 2: min-max 0..2 -> fractions 0, .25, .5, 1 -> 0, 63.75 -> 64, 127.5 -> 128, 255
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    for keep in (False, True):
        out, text = convert_pil_image(img, keep_16bit=keep)
        assert (out.mode, text, _px(out)) == ("L", "F->L (min-max 0..2 stretched to 0..255)", [[0, 64, 128, 255]])


def test_alpha_palette_and_colour_modes():
    la = Image.new("LA", (2, 1))
    la.putdata([(200, 255), (200, 0)])
    out, text = convert_pil_image(la)
    assert (out.mode, text, _px(out)) == ("L", "LA->L (alpha composited over white)", [[200, 255]])
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0)])
    out, text = convert_pil_image(rgba)
    assert (out.mode, text, _px(out)) == ("RGB", "RGBA->RGB (alpha composited over white)",
                                          [[[10, 20, 30], [255, 255, 255]]])
    out, text = convert_pil_image(rgba.convert("RGBa"))
    assert (out.mode, text) == ("RGB", "RGBa->RGB (alpha composited over white)")
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pal.putdata([0, 1])
    out, text = convert_pil_image(pal)
    assert (out.mode, text, _px(out)) == ("RGB", "P->RGB (palette expanded)", [[[0, 0, 0], [9, 8, 7]]])
    pal.info["transparency"] = 0
    out, text = convert_pil_image(pal)
    assert (out.mode, text, _px(out)) == ("RGB", "P with transparency->RGB (alpha composited over white)",
                                          [[[255, 255, 255], [9, 8, 7]]])
    out, text = convert_pil_image(pal.convert("PA"))
    assert (out.mode, text) == ("RGB", "PA->RGB (alpha composited over white)")
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    out, text = convert_pil_image(cmyk)
    assert (out.mode, text, _px(out)) == ("RGB", "CMYK->RGB (naive, no ICC profile)", [[[255, 255, 255]]])
    for mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        out, text = convert_pil_image(Image.new("RGB", (1, 1), (255, 0, 0)).convert(mode))
        assert (out.mode, text) == ("RGB", f"{mode}->RGB")


def test_pil_img2rgb_composites_every_alpha_over_white():
    for mode in ("RGBA", "LA", "PA", "RGBa"):   # (PIL converts La to nothing, so it is not tested)
        img = Image.new("RGBA", (1, 1), (10, 20, 30, 0)).convert(mode)
        assert _px(pil_img2rgb(img)) == [[[255, 255, 255]]], mode
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(0, 0, 0), (5, 6, 7)])
    rgb.info["transparency"] = (0, 0, 0)
    assert _px(pil_img2rgb(rgb)) == [[[255, 255, 255], [5, 6, 7]]]
    plain = Image.new("L", (1, 1), 9)
    assert pil_img2rgb(plain).mode == "RGB" and _px(pil_img2rgb(plain)) == [[[9, 9, 9]]]


def test_convert_unusual_records_what_it_did():
    data = _encode(Image.fromarray(np.array([[1000, 4000]], dtype=np.uint16)))
    mode = Image.open(io.BytesIO(data)).mode
    conv = convert_unusual(data)
    assert (conv.width, conv.height, conv.mode) == (2, 1, "L")
    assert conv.meta == {"source_format": "PNG", "source_mode": mode, "output_mode": "L",
                         "conversion": f"{mode}->L (min-max 1000..4000 stretched to 0..255)"}
    assert _px(Image.open(io.BytesIO(conv.png))) == [[0, 255]]
    la = convert_unusual(_encode(Image.new("LA", (3, 2))))
    assert la.png is None and (la.width, la.height, la.mode) == (3, 2, "RGB")
    assert la.meta == {"source_format": "PNG", "source_mode": "LA", "output_mode": "RGB",
                       "conversion": "LA->RGB (alpha composited over white at decode time, as upstream pil_img2rgb)"}
    buf = io.BytesIO()
    pages = [Image.fromarray(np.array([[i, 100]], dtype=np.uint16)) for i in (0, 50)]
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    tiff = convert_unusual(buf.getvalue())
    assert tiff.meta["pages"] == 2 and tiff.meta["page_used"] == 0
    assert _px(Image.open(io.BytesIO(tiff.png))) == [[0, 255]]              # page 0: 0..100
    one_page = convert_unusual(_encode(Image.new("LA", (1, 1)), "PNG"))
    assert "pages" not in one_page.meta and "page_used" not in one_page.meta


def test_header_mode_check_edges():
    png = _encode(Image.new("L", (2, 2)))
    assert header_mode_is_plain(png) is True and header_mode_is_plain(png[:26]) is True
    assert header_mode_is_plain(png[:25]) is None                          # IHDR cut before the colour type
    assert header_mode_is_plain(png[:12] + b"IHDX" + png[16:]) is None      # not an IHDR chunk
    assert header_mode_is_plain(_encode(Image.new("RGB", (2, 2)))) is True
    assert header_mode_is_plain(_encode(Image.new("RGBA", (2, 2)))) is False   # (8, 6)
    assert header_mode_is_plain(_encode(Image.new("P", (2, 2)))) is False      # (8, 3)
    assert header_mode_is_plain(_encode(Image.new("1", (2, 2)))) is False      # (1, 0)
    jpeg = _encode(Image.new("L", (8, 8)), "JPEG")
    pos = jpeg_sof_offset(jpeg)
    assert header_mode_is_plain(jpeg[:pos + 10]) is True                   # the component count is byte pos + 9
    assert header_mode_is_plain(jpeg[:pos + 9]) is None
    assert header_mode_is_plain(b"\xff\xd8\xff\xe0" + b"\x00" * 20) is None   # no SOF segment
    assert header_mode_is_plain(_encode(Image.new("CMYK", (8, 8)), "JPEG")) is False
    assert header_mode_is_plain(b"GIF89a" + b"\x00" * 30) is None


def test_formats_without_frames_are_one_page():
    buf = io.BytesIO()
    Image.new("P", (3, 2)).save(buf, format="BMP")     # PIL's BMP reader has no n_frames
    conv = convert_unusual(buf.getvalue())
    assert conv.png is None and conv.meta == {"source_format": "BMP", "source_mode": "P", "output_mode": "RGB",
                                              "conversion": "P->RGB (palette expanded at decode time)"}
