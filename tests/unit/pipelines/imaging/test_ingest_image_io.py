"""pipelines.imaging.probe: header probing, reason codes, path safety and the format-handler registry."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import pandas as pd
import pytest
from PIL import Image

from datasets_catalog.catalog import load_catalog
from pipelines.imaging import probe as image_io
from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.imaging.probe import FormatHandler, ImageError, ImageProbe, probe_image, \
    register_format, resolve_image_path
from pipelines.ingest.driver import run_ingest


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb needs no real pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_probe_reads_header_and_hashes_bytes(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (33, 17)).save(path)
    probe = probe_image(path, max_pixels=10_000)
    assert (probe.width, probe.height, probe.format) == (33, 17, "PNG")
    assert probe.data == path.read_bytes() and probe.sha256 == hashlib.sha256(probe.data).hexdigest()


def test_bomb_is_rejected_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))   # 10^10 pixels declared in a few bytes
    with pytest.raises(ImageError) as info:
        probe_image(path, max_pixels=20_000_000)
    assert info.value.reason == "image_too_large"
    path.write_bytes(_png_with_header(5000, 5000))
    with pytest.raises(ImageError, match="over the cap"):
        probe_image(path, max_pixels=20_000_000)


def test_zero_sized_image_is_empty(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_with_header(0, 10))
    with pytest.raises(ImageError) as info:
        probe_image(path, max_pixels=1000)
    assert info.value.reason == "image_empty"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        probe_image(path, max_pixels=1000)
    assert info.value.reason == "image_empty"


def test_verify_decodes_pixels(tmp_path):
    path = tmp_path / "bad_data.png"
    good = io.BytesIO()
    Image.radial_gradient("L").save(good, "PNG")
    data = bytearray(good.getvalue())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = b"\x00" * 40                   # structure intact, compressed stream broken
    path.write_bytes(bytes(data))
    probe_image(path, max_pixels=10**6)                     # header-only probing cannot see this...
    with pytest.raises(ImageError) as info:
        probe_image(path, max_pixels=10**6, verify=True)    # ...--verify-images can
    assert info.value.reason == "image_corrupt"


def test_resolve_image_path(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    assert resolve_image_path(root, "a/x.png")[1] == "a/x.png"
    assert resolve_image_path(root, "a/../a/x.png")[1] == "a/x.png"
    assert resolve_image_path(root, "/a/x.png")[1] == "a/x.png"
    for bad in ("../data/../x.png", "/etc/passwd", "a/../../x.png"):
        with pytest.raises(ImageError) as info:
            resolve_image_path(root, bad)
        assert info.value.reason == "path_escapes_data_dir"


def test_readers_composite_transparency_over_white():
    from pipelines.imaging.decode import load_image_rgb

    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(buf, "PNG")
    assert load_image_rgb(buf.getvalue(), None).getpixel((0, 0)) == (255, 255, 255)


@pytest.fixture
def fake_format():
    """A toy handler: files starting with b'FAKE' + frame count; each frame is a 20x10 PNG."""
    def sniff(head, path):
        return head.startswith(b"FAKE")

    def probe(data, path, context):
        frames = int(data[4:5])
        png = io.BytesIO()
        Image.new("L", (20, 10)).save(png, "PNG")
        one = ImageProbe(20, 10, "PNG", png.getvalue(), hashlib.sha256(data).hexdigest(),
                         meta={"modality": "FAKE", "window": context.options.get("window")})
        if frames <= 1:
            return one
        return ImageProbe(20, 10, "PNG", one.data, one.sha256, one.meta,
                          frames=tuple(ImageProbe(20, 10, "PNG", one.data, f"{one.sha256}:{i}", one.meta)
                                       for i in range(frames)))

    register_medical_imaging()   # what the ingest registers first, so "fake" is tried before it
    saved = list(image_io.HANDLERS)
    register_format(FormatHandler("fake", sniff, probe))
    yield
    image_io.HANDLERS[:] = saved


def test_registered_handler_and_frame_expansion(tmp_path, fake_format):
    data = tmp_path / "data"
    data.mkdir()
    (data / "one.fake").write_bytes(b"FAKE1")
    (data / "three.fake").write_bytes(b"FAKE3")
    rec = lambda p: json.dumps({"input_img": [{"path": p}], "message": [{"from": "human", "value": "<image> q"},
                                                                         {"from": "gpt", "value": "a"}]})
    (tmp_path / "d.jsonl").write_text(rec("one.fake") + "\n" + rec("three.fake") + "\n")
    (tmp_path / "c.yaml").write_text("output_dir: out\ndatasets:\n  - {name: d, task: sft, jsonl_path: d.jsonl, "
                                     "data_dir: data, window: lung}\n")
    run_ingest(load_catalog(tmp_path / "c.yaml"), executor="local", progress=False, log=lambda m: None)
    frame = pd.read_parquet(tmp_path / "out" / "d")
    assert list(frame["sample_id"]) == ["d:1", "d:2:0", "d:2:1", "d:2:2"]
    meta = json.loads(frame.iloc[0]["input_images"][0]["meta"])
    assert meta == {"modality": "FAKE", "window": "lung"}
    manifest = json.loads((tmp_path / "out" / "d" / "_manifest.json").read_text())
    assert (manifest["rows_read"], manifest["rows_written"], manifest["samples_written"]) == (2, 2, 4)


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                         ("JPEG", {"exif": b"Exif\x00\x00" + b"\x00" * 32}), ("GIF", {}),
                                         ("BMP", {}), ("TIFF", {})])
@pytest.mark.parametrize("mode, size", [("L", (1, 1)), ("RGB", (37, 211)), ("RGBA", (300, 17)), ("L", (640, 480))])
def test_header_fast_path_agrees_with_pil(tmp_path, fmt, kwargs, mode, size):
    if fmt == "JPEG" and mode == "RGBA":
        mode = "RGB"
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, size, 90).save(path, fmt, **kwargs)
    probe = probe_image(path, max_pixels=10**7)
    with Image.open(path) as image:
        assert (probe.width, probe.height, probe.format) == (*image.size, image.format)
    assert probe.data == path.read_bytes()
