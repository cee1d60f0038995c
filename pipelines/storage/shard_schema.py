"""The shard schema: the only contract between ingest and everything that reads shards.

Shards are plain Parquet (`pandas.read_parquet("shards/<dataset>")` works). Bump SCHEMA_VERSION on any
incompatible change; readers check it in `_manifest.json`.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

MESSAGE_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])

IMAGE_TYPE = pa.struct([
    ("path", pa.string()),          # relative to data_dir, as written in the JSONL
    ("width", pa.int32()),          # real size read from the file header
    ("height", pa.int32()),
    ("format", pa.string()),        # PNG, JPEG, DICOM, NIFTI, ...
    ("vae_width", pa.int32()),      # resize-rule targets under the dataset's transforms
    ("vae_height", pa.int32()),
    ("vae_tokens", pa.int32()),
    ("vit_width", pa.int32()),
    ("vit_height", pa.int32()),
    ("vit_tokens", pa.int32()),
    ("sha256", pa.string()),        # content hash of the (decoded-source) bytes: duplicate / leakage checks
    ("bytes", pa.binary()),         # original encoded bytes; null with --reference-images
    ("meta", pa.string()),          # JSON: medical metadata (modality, window, spacing, ...) or null
    # `store_pixels` datasets only (null otherwise): the image already decoded, converted to RGB and resized
    # to (vae_width, vae_height) / (vit_width, vit_height), as raw row-major HWC uint8 (pipelines.imaging.pixels).
    # Added without a schema bump: older shards simply lack them and readers fall back to decoding `bytes`.
    ("vae_pixels", pa.binary()),
    ("vit_pixels", pa.binary()),
])
PIXEL_FIELDS = ("vae_pixels", "vit_pixels")   # the stored-pixel fields above, per target (vae, vit)

SHARD_SCHEMA = pa.schema([
    ("sample_id", pa.string()),     # "<dataset>:<line_number>[:<frame>]", unique within the catalog
    ("dataset", pa.string()),
    ("task", pa.string()),          # task-kind alias (datasets_catalog.task_kinds)
    ("line_number", pa.int64()),    # 1-based line in the source JSONL
    ("messages", pa.list_(MESSAGE_TYPE)),
    ("input_images", pa.list_(IMAGE_TYPE)),
    ("output_images", pa.list_(IMAGE_TYPE)),
    ("text_tokens", pa.int64()),    # text tokens of the plan (without markers)
    ("num_tokens", pa.int64()),     # packed length: what the packer counts (content + 2 per element)
    ("extra", pa.string()),         # JSON of unrecognised fields: nothing is lost
])


def leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet column paths of the schema's leaves (lists of structs become `name.list.element.field`)."""
    paths = []
    for f in schema:
        if pa.types.is_list(f.type) and pa.types.is_struct(f.type.value_type):
            paths.extend(f"{f.name}.list.element.{sub.name}" for sub in f.type.value_type)
        else:
            paths.append(f.name)
    return paths


# What the packer reads from `store_pixels` shards: everything but the original image bytes (often as large
# as the pixels themselves and not needed when the stored pixels have the configured sizes).
PIXEL_SHARD_READ_COLUMNS = tuple(p for p in leaf_paths(SHARD_SCHEMA) if not p.endswith(".bytes"))


REJECTS_SCHEMA = pa.schema([
    ("line_number", pa.int64()),
    ("reason", pa.string()),        # short stable code, e.g. "image_missing"
    ("detail", pa.string()),        # a sentence a person can act on
    ("raw", pa.string()),           # the original line (decoded with replacement if not UTF-8)
])
