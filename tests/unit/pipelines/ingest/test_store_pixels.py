"""store_pixels: images decoded and resized at ingest, used by the packer without decoding.

Real ingest (local executor, the same process_chunk Ray runs), real Parquet, real PIL decoding.
"""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datasets_catalog.catalog import CatalogError, load_catalog
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.packing import packer as packing
from pipelines.imaging.decode import image_to_tensor, load_image_rgb
from pipelines.imaging.pixels import stored_pixels_tensor
from pipelines.ingest.build import STATUS_BUILT
from pipelines.ingest.driver import run_ingest
from pipelines.mixture.recompute import recompute_row
from pipelines.packing.config import PackingConfig
from pipelines.packing.sample import StreamSample

VAE = ImageTransformArgs(max_image_size=96, min_image_size=32, image_stride=16)
VIT = ImageTransformArgs(max_image_size=84, min_image_size=28, image_stride=14, max_pixels=84 * 84)
PACKING = PackingConfig(expected_num_tokens=2048, max_num_tokens=4096, max_num_tokens_per_sample=4096,
                        prefer_buffer_before=1024, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0,
                        text_cond_dropout_prob=0.0)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _noise(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if bands == 1 else array, mode)


def _corrupt_body_png() -> bytes:
    """A PNG whose header, chunk layout and end marker are intact but whose pixel data is garbage."""
    data = bytearray(_encode(_noise("RGB", 60, 50, 9), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 200] = bytes(190)
    return bytes(data)


@pytest.fixture
def edit_catalog(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    files = {"rgb.png": _encode(_noise("RGB", 130, 70, 1), "PNG"),
             "alpha.png": _encode(_noise("RGBA", 64, 100, 2), "PNG"),
             "grey.png": _encode(_noise("L", 90, 90, 3), "PNG"),
             "photo.jpg": _encode(_noise("RGB", 150, 120, 4), "JPEG"),
             "broken.png": _corrupt_body_png()}
    for name, blob in files.items():
        (data / name).write_bytes(blob)
    pairs = [("rgb.png", "alpha.png"), ("grey.png", "photo.jpg"), ("photo.jpg", "rgb.png"), ("rgb.png", "broken.png")]
    lines = [json.dumps({"input_img": [{"path": a}], "output_img": [{"path": b}],
                         "message": [{"from": "human", "value": f"<image>\nedit {i}"},
                                     {"from": "gpt", "value": "done"}]}) for i, (a, b) in enumerate(pairs)]
    (tmp_path / "edit.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "output_dir: out\nmax_reject_fraction: 1.0\nstore_pixels: true\ndatasets:\n"
        "  - name: edit\n    task: edit\n    jsonl_path: edit.jsonl\n    data_dir: data\n"
        f"    image_transform_args: {json.dumps(VAE.to_dict())}\n"
        f"    vit_image_transform_args: {json.dumps(VIT.to_dict())}\n")
    return path


def _ingest(path: Path, **kw) -> list[dict]:
    catalog = load_catalog(path)
    report = run_ingest(catalog, executor="local", progress=False, log=lambda m: None, **kw)
    assert report.ok, report
    return pq.read_table(catalog.output_dir / "edit").to_pylist()


def _sample(row: dict, data_dir: Path) -> StreamSample:
    return StreamSample(row["sample_id"], "edit", "edit", "edit", row["num_tokens"], row, str(data_dir),
                        row["line_number"])


def test_stored_pixels_equal_the_decode_path_bit_for_bit(edit_catalog):
    rows = _ingest(edit_catalog)
    manifest = json.loads((edit_catalog.parent / "out" / "edit" / "_manifest.json").read_text())
    assert manifest["settings"]["store_pixels"] is True
    assert len(rows) == 3 and manifest["rows_rejected"] == 1
    seen_modes = set()
    for row in rows:
        for image in (*row["input_images"], *row["output_images"]):
            decoded = load_image_rgb(image["bytes"], None)
            seen_modes.add(Image.open(io.BytesIO(image["bytes"])).mode)
            for which in ("vae", "vit"):
                w, h = image[f"{which}_width"], image[f"{which}_height"]
                assert len(image[f"{which}_pixels"]) == w * h * 3
                stored = stored_pixels_tensor(image, which)
                assert stored.shape == (3, h, w)
                assert torch.equal(stored, image_to_tensor(decoded, w, h))
    assert seen_modes == {"RGB", "RGBA", "L"}


def test_packer_uses_stored_pixels_and_builds_the_same_batch(edit_catalog, monkeypatch):
    rows = _ingest(edit_catalog)
    data_dir = edit_catalog.parent / "data"
    tok = TextTokenizer.builtin()
    decoded_rows = [{**r, "input_images": [{**i, "vae_pixels": None, "vit_pixels": None} for i in r["input_images"]],
                     "output_images": [{**i, "vae_pixels": None, "vit_pixels": None} for i in r["output_images"]]}
                    for r in rows]
    reference = packing.build_packed_batch([_sample(r, data_dir) for r in decoded_rows], PACKING, tok, 7,
                                           on_image_error="raise")

    def no_decoding(*args, **kwargs):
        raise AssertionError("a store_pixels row must not be decoded")

    monkeypatch.setattr(packing, "load_image_rgb", no_decoding)
    batch = packing.build_packed_batch([_sample(r, data_dir) for r in rows], PACKING, tok, 7, on_image_error="raise")
    assert torch.equal(batch.padded_images, reference.padded_images)
    assert torch.equal(batch.packed_vit_tokens, reference.packed_vit_tokens)
    assert torch.equal(batch.packed_text_ids, reference.packed_text_ids)


def test_other_transforms_drop_the_stored_pixels_and_decode(edit_catalog):
    row = _ingest(edit_catalog)[0]
    bigger = replace(VAE, max_image_size=128)
    changed = recompute_row(row, resolve_task_kind("edit"), bigger, VIT, TextTokenizer.builtin())
    for image in changed["input_images"]:
        assert image["vae_pixels"] is None and image["vit_pixels"] is not None   # only the VAE target moved
    unchanged = recompute_row(row, resolve_task_kind("edit"), VAE, VIT, TextTokenizer.builtin())
    assert unchanged["input_images"][0]["vae_pixels"] == row["input_images"][0]["vae_pixels"]
    pixels = packing._SampleImages(_sample(changed, edit_catalog.parent / "data")).pixels(
        packing.ImageSlot("input", 0), "vae")
    image = changed["input_images"][0]
    assert pixels.shape == (image["vae_height"], image["vae_width"], 3)
    decoded = load_image_rgb(image["bytes"], None).resize((image["vae_width"], image["vae_height"]),
                                                          Image.Resampling.BICUBIC)
    assert torch.equal(pixels, torch.from_numpy(np.array(decoded)))


def test_stale_pixels_of_another_size_are_ignored():
    image = {"vae_width": 32, "vae_height": 16, "vae_pixels": bytes(16 * 16 * 3)}
    assert stored_pixels_tensor(image, "vae") is None
    assert stored_pixels_tensor({"vae_width": 32, "vae_height": 16}, "vae") is None


def test_a_body_that_does_not_decode_is_rejected_only_when_pixels_are_stored(edit_catalog):
    _ingest(edit_catalog)
    rejects = pq.read_table(edit_catalog.parent / "out" / "edit" / "_rejects.parquet").to_pylist()
    assert [(r["line_number"], r["reason"]) for r in rejects] == [(4, "image_corrupt")]
    assert "does not decode" in rejects[0]["detail"]
    edit_catalog.write_text(edit_catalog.read_text().replace("store_pixels: true", "store_pixels: false"))
    rows = _ingest(edit_catalog)   # settings changed: rebuilt, header probing accepts the file
    assert len(rows) == 4 and all(i["vae_pixels"] is None for r in rows for i in r["input_images"])


def test_cli_flag_and_catalog_errors(edit_catalog):
    edit_catalog.write_text(edit_catalog.read_text().replace("store_pixels: true\n", ""))
    assert not load_catalog(edit_catalog).datasets["edit"].store_pixels
    assert load_catalog(edit_catalog).with_store_pixels().datasets["edit"].store_pixels
    first = run_ingest(load_catalog(edit_catalog), executor="local", progress=False, log=lambda m: None)
    again = run_ingest(load_catalog(edit_catalog).with_store_pixels(), executor="local", progress=False,
                       log=lambda m: None)
    assert first.datasets[0].status == again.datasets[0].status == STATUS_BUILT   # toggling rebuilds
    edit_catalog.write_text(edit_catalog.read_text().replace("    task: edit\n", "    task: edit\n    store_pixels: 3\n"))
    with pytest.raises(CatalogError, match=r"line \d+.*store_pixels.*true or false"):
        load_catalog(edit_catalog)


def test_ingest_workers_without_store_pixels_do_not_import_torch():
    """torch costs ~1 s per Ray worker start; only store_pixels chunks need it."""
    import subprocess
    import sys

    from pipelines.imaging import pixels as image_pixels


    from pipelines.ingest import chunk as ingest_chunk

    assert ingest_chunk.PIXEL_FIELDS == image_pixels.PIXEL_FIELDS
    code = "import sys, pipelines.ingest.chunk; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[4])
    assert out.stdout.strip() == "False"
