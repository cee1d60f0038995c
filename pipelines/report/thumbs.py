"""Thumbnails of random shard rows, decoded exactly as the trainer decodes them.

Rows are drawn with a seeded RNG per dataset; only the row groups holding them are read, and only the
image columns. Each image goes through `pipelines.imaging.decode.load_image_rgb` and the trainer's bicubic
resize (`resize_rgb`) to its stored VAE size: the pixels the model gets, before the [-1, 1] scaling.
"""
from __future__ import annotations

import bisect
import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines.report.scan import IMAGE_COLUMNS, DatasetStats
from pipelines.storage.shard_reader import open_shard

THUMB_PX = 160


@dataclass(frozen=True)
class Thumbnail:
    sample_id: str
    caption: str
    png: bytes | None      # None: could not be decoded (error says why)
    error: str | None = None


def _trainer_view(data: bytes | None, path: Path | None, meta: str | None, width: int | None,
                  height: int | None) -> bytes:
    """PNG thumbnail of what the trainer sees: the decoded RGB image resized to its stored VAE target."""
    from pipelines.imaging.decode import load_image_rgb, resize_rgb

    image = load_image_rgb(data, path, meta)
    if width and height:
        image = resize_rgb(image, int(width), int(height))
    image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def dataset_thumbnails(stats: DatasetStats, count: int, seed: int) -> list[Thumbnail]:
    """Up to `count` thumbnails of random rows with images (first image of each row)."""
    files = {path: open_shard(path) for path in stats.files}   # each footer read once
    groups = [(path, g, pf.metadata.row_group(g).num_rows) for path, pf in files.items()
              for g in range(pf.metadata.num_row_groups)]
    starts = list(itertools.accumulate((n for _, _, n in groups), initial=0))   # first row of each group
    total = starts[-1]
    if not total:
        return []
    rng = random.Random(f"{seed}:{stats.name}")
    picked = sorted(rng.sample(range(total), min(total, max(count * 3, count))))
    data_dir = stats.manifest.get("data_dir")
    out: list[Thumbnail] = []
    cache: dict[tuple[Path, int], dict] = {}
    for k in picked:
        if len(out) >= count:
            break
        at = bisect.bisect_right(starts, k) - 1
        path, group, offset = groups[at][0], groups[at][1], k - starts[at]
        key = (path, group)
        if key not in cache:
            pf = files[path]
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
