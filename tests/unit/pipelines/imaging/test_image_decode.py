"""The shared image decoder: RGB conversion with transparency over white, resize + normalise, plug-ins."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.imaging.decode import ImageDecodeError, image_to_tensor, load_image_rgb
from pipelines.imaging.decoders import ImageDecoder, register_decoder, unregister_decoder


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_transparency_is_composited_over_white():
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (200, 10, 10, 0)       # fully transparent red -> white
    arr[0, 1] = (200, 10, 10, 255)     # opaque red stays red
    arr[0, 2] = (0, 0, 0, 128)         # half-transparent black -> mid grey
    image = load_image_rgb(encode(Image.fromarray(arr, "RGBA")), None)
    assert image.mode == "RGB"
    out = np.asarray(image)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 10, 10)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])


def test_palette_transparency_entry_and_la_are_composited_over_white():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    data = encode(pal, transparency=0)   # palette index 0 (black) is transparent
    out = np.asarray(load_image_rgb(data, None))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (255, 0, 0)
    la = Image.fromarray(np.array([[[0, 0], [30, 255]]], dtype=np.uint8), "LA")
    out = np.asarray(load_image_rgb(encode(la), None))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (30, 30, 30)


def test_grey_and_jpeg_become_rgb():
    grey = Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), "L")
    out = load_image_rgb(encode(grey), None)
    assert out.mode == "RGB" and out.size == (5, 4) and np.all(np.asarray(out) == 77)
    jpeg = load_image_rgb(encode(Image.new("RGB", (8, 8), (0, 128, 255)), "JPEG"), None)
    assert jpeg.mode == "RGB" and jpeg.size == (8, 8)


def test_image_to_tensor_is_bicubic_resize_then_normalise():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    tensor = image_to_tensor(source, 32, 16)
    assert tensor.shape == (3, 16, 32) and tensor.dtype == torch.float32
    expected = np.asarray(source.resize((32, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(expected).permute(2, 0, 1) - 0.5) / 0.5
    assert torch.allclose(tensor, expected, atol=1e-6)
    assert tensor.min() >= -1 and tensor.max() <= 1
    # extremes map to -1 and +1 exactly
    bw = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8), "RGB")
    assert image_to_tensor(bw, 2, 1)[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert image_to_tensor(bw, 2, 1)[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_downscaling_antialiases():
    # a 1-pixel checkerboard shrunk 4x averages to grey with antialiasing (nearest would keep 0 or 255)
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    tensor = image_to_tensor(Image.fromarray(board, "L"), 16, 16)
    assert tensor.abs().max() < 0.1


def test_reads_referenced_file_and_reports_errors(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (3, 2), (1, 2, 3))))
    assert np.asarray(load_image_rgb(None, path))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ImageDecodeError, match="missing.png"):
        load_image_rgb(None, tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="bad.png"):
        load_image_rgb(b"\x89PNG\r\n\x1a\nnot really", tmp_path / "bad.png")
    with pytest.raises(ImageDecodeError, match="neither"):
        load_image_rgb(None, None)


def test_a_new_format_plugs_in_by_sniffing_bytes():
    def decode(data, path, meta):
        value = int(data[len(b"FAKEIMG"):])
        return Image.new("L", (2, 2), value)

    register_decoder(ImageDecoder("fake", lambda data, path: data.startswith(b"FAKEIMG"), decode))
    try:
        out = load_image_rgb(b"FAKEIMG42", None)
        assert out.mode == "RGB" and np.all(np.asarray(out) == 42)
        # other bytes still go to PIL
        assert load_image_rgb(encode(Image.new("RGB", (1, 1))), None).size == (1, 1)
    finally:
        unregister_decoder("fake")
    with pytest.raises(ImageDecodeError):
        load_image_rgb(b"FAKEIMG42", None)


def _smooth_jpeg(w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 128 + 80 * np.sin(xx / w * 5) * np.cos(yy / h * 3)
    arr = np.stack([base, 255 - base, base * 0.5 + 40], -1).clip(0, 255).astype(np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=92)


def test_jpeg_draft_decodes_at_reduced_scale_never_below_the_target_and_stays_close():
    data = _smooth_jpeg(400, 320)
    full = load_image_rgb(data, None)
    assert full.size == (400, 320)
    assert load_image_rgb(data, None, draft_size=(100, 80)).size == (100, 80)      # 1/4 scale
    assert load_image_rgb(data, None, draft_size=(150, 100)).size == (200, 160)    # 1/2: 1/4 would be < 150
    assert load_image_rgb(data, None, draft_size=(300, 80)).size == (400, 320)     # less than 2x: full decode
    a = image_to_tensor(full, 96, 80)
    b = image_to_tensor(load_image_rgb(data, None, draft_size=(96, 80)), 96, 80)
    assert a.shape == b.shape and not torch.equal(a, b)                            # approximate, not exact
    assert (a - b).abs().mean() * 127.5 < 2.0                                      # < 2 grey levels on average
    png = encode(Image.open(io.BytesIO(data)).convert("RGB"))                      # other formats: untouched
    assert load_image_rgb(png, None, draft_size=(100, 80)).size == (400, 320)
