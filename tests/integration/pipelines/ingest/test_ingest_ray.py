"""One real Ray Data run over the shipped example catalog (catalog/radiology.yaml)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from datasets_catalog.catalog import load_catalog
from datasets_catalog.records import vit_img_num
from datasets_catalog.transforms import resize_target, vae_tokens, vit_tokens
from pipelines.ingest.build import STATUS_BUILT, STATUS_UP_TO_DATE
from pipelines.ingest.driver import format_summary, run_ingest

ROOT = Path(__file__).resolve().parents[4]


def test_example_catalog_through_ray_data(ray_cluster, tmp_path):
    catalog = load_catalog(ROOT / "catalog" / "radiology.yaml")
    address = ray_cluster.get_runtime_context().gcs_address
    report = run_ingest(catalog, out=tmp_path, address=address, progress=False, log=lambda m: None)
    assert report.ok and {d.status for d in report.datasets} == {STATUS_BUILT}
    summary = format_summary(report)
    assert "TOTAL" in summary and all(name in summary for name in catalog.datasets)

    sample_ids = []
    for spec in catalog.datasets.values():
        folder = tmp_path / spec.name
        manifest = json.loads((folder / "_manifest.json").read_text())
        lines = [line for line in spec.jsonl_path.read_bytes().splitlines() if line.strip()]
        assert manifest["rows_read"] == len(lines) == manifest["rows_written"] + manifest["rows_rejected"]
        assert manifest["rows_rejected"] == 0, manifest["rejects_by_reason"]
        assert manifest["source"]["sha256"] == hashlib.sha256(spec.jsonl_path.read_bytes()).hexdigest()
        assert manifest["data_dir"] == (str(spec.data_dir) if spec.data_dir else None)
        assert manifest["split"] == spec.split and manifest["catalog"] == str(catalog.path.resolve())
        assert manifest["transforms"]["image_transform_args"] == spec.image_transform_args.to_dict()
        frame = pd.read_parquet(folder)
        assert len(frame) == manifest["samples_written"] == sum(s["rows"] for s in manifest["shards"])
        assert set(frame["line_number"]) == set(range(1, manifest["rows_written"] + 1))
        assert set(frame["task"]) == {spec.task.name}
        sample_ids.extend(frame["sample_id"])
        images = 0
        for _, row in frame.iterrows():
            n_in = len(row["input_images"])
            for image in [*row["input_images"], *row["output_images"]]:
                images += 1
                raw = (spec.data_dir / image["path"]).read_bytes()
                if image["format"] in ("DICOM", "NIFTI"):   # decoded by the registered medical handler
                    assert image["bytes"].startswith(b"\x89PNG") and image["meta"]
                else:
                    assert image["bytes"] == raw and image["sha256"] == hashlib.sha256(raw).hexdigest()
                assert Image.open(io.BytesIO(image["bytes"])).size == (image["width"], image["height"])
                vae = resize_target(image["width"], image["height"], spec.image_transform_args)
                vit = resize_target(image["width"], image["height"], spec.vit_image_transform_args,
                                    vit_img_num(spec.task, n_in))
                assert (image["vae_width"], image["vae_height"], image["vae_tokens"]) == (*vae, vae_tokens(*vae))
                assert (image["vit_width"], image["vit_height"], image["vit_tokens"]) == (*vit, vit_tokens(*vit))
            assert row["num_tokens"] > row["text_tokens"] > 0
        assert images == manifest["images"]
    assert len(sample_ids) == len(set(sample_ids)) >= 37
    assert not report.warnings, report.warnings           # the shipped example has no train/val leakage
    formats = {f for d in catalog.datasets for f in pd.read_parquet(tmp_path / d)["input_images"].map(
        lambda images: images[0]["format"] if len(images) else None)}
    assert {"PNG", "JPEG", "DICOM", "NIFTI"} <= formats

    again = run_ingest(catalog, out=tmp_path, address=address, progress=False, log=lambda m: None)
    assert {d.status for d in again.datasets} == {STATUS_UP_TO_DATE}

    # --store-pixels through Ray Data: a settings change rebuilds; pixels equal the decode path (DICOM too)
    from pipelines.imaging.decode import image_to_tensor, load_image_rgb
    from pipelines.imaging.pixels import stored_pixels_tensor

    names = ["mr_echo_dicom", "he_to_ihc_edit"]
    pixels = run_ingest(catalog.with_store_pixels(), out=tmp_path, address=address, only=names, progress=False,
                        log=lambda m: None)
    assert pixels.ok and {d.status for d in pixels.datasets} == {STATUS_BUILT}
    for name in names:
        for images in pd.read_parquet(tmp_path / name)[["input_images", "output_images"]].itertuples(index=False):
            for image in [*images.input_images, *images.output_images]:
                decoded = load_image_rgb(image["bytes"], None, image["meta"])
                for which in ("vae", "vit"):
                    want = image_to_tensor(decoded, image[f"{which}_width"], image[f"{which}_height"])
                    assert torch.equal(stored_pixels_tensor(image, which), want)
