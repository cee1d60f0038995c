"""Thumbnails of random shard rows, decoded exactly as the trainer decodes them.

Rows are drawn with a seeded RNG per dataset; only the row groups holding them are read, and only the
image columns. Each image goes through `pipelines.image_decode.load_image_rgb` and `image_to_tensor` at
its stored VAE size (what the model gets), then back to 8-bit for display.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines.report_scan import IMAGE_COLUMNS, DatasetStats

THUMB_PX = 160


@dataclass(frozen=True)
class Thumbnail:
    sample_id: str
    caption: str
    png: bytes | None      # None: could not be decoded (error says why)
    error: str | None = None


def _row_positions(files: list[Path]) -> list[tuple[Path, int, int]]:
    """(file, row group, offset) for every row, from footers only."""
    out = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            out.extend((path, g, i) for i in range(meta.row_group(g).num_rows))
    return out


def _trainer_view(data: bytes | None, path: Path | None, meta: str | None, width: int | None,
                  height: int | None) -> bytes:
    from pipelines.image_decode import image_to_tensor, load_image_rgb

    image = load_image_rgb(data, path, meta)
    if width and height:
        tensor = image_to_tensor(image, int(width), int(height))
        arr = ((tensor.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def dataset_thumbnails(stats: DatasetStats, count: int, seed: int) -> list[Thumbnail]:
    """Up to `count` thumbnails of random rows with images (first image of each row)."""
    positions = _row_positions(stats.files)
    if not positions:
        return []
    rng = random.Random(f"{seed}:{stats.name}")
    picked = sorted(rng.sample(range(len(positions)), min(len(positions), max(count * 3, count))))
    data_dir = stats.manifest.get("data_dir")
    out: list[Thumbnail] = []
    cache: dict[tuple[Path, int], dict] = {}
    for k in picked:
        if len(out) >= count:
            break
        path, group, offset = positions[k]
        key = (path, group)
        if key not in cache:
            pf = pq.ParquetFile(path)
            cols = [c for c in ("sample_id", *IMAGE_COLUMNS) if c in pf.schema_arrow.names]
            cache.clear()  # one row group at a time: bounded memory
            cache[key] = pf.read_row_group(group, columns=cols).to_pydict()
        rows = cache[key]
        images = [*(rows.get("input_images", [None])[offset] or []),
                  *(rows.get("output_images", [None])[offset] or [])]
        if not images:
            continue
        img = images[0]
        sample_id = str(rows.get("sample_id", ["?"])[offset])
        caption = f"{sample_id} · {img.get('width')}x{img.get('height')} {img.get('format') or ''}".strip()
        ref = Path(data_dir) / img["path"] if (img.get("bytes") is None and data_dir and img.get("path")) else None
        try:
            png = _trainer_view(img.get("bytes"), ref, img.get("meta"), img.get("vae_width"), img.get("vae_height"))
            out.append(Thumbnail(sample_id, caption, png))
        except Exception as exc:  # a thumbnail that fails is itself a finding: show why
            out.append(Thumbnail(sample_id, caption, None, f"{type(exc).__name__}: {exc}"))
    return out
