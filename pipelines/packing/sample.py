"""`StreamSample`: what the mixture stream hands to the packer for one drawn sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StreamSample:
    sample_id: str
    dataset: str
    group: str
    task: str                  # task-kind alias (datasets_catalog.task_kinds)
    num_tokens: int            # packed length (shard column; recomputed if config transforms differ)
    row: dict[str, Any]        # the shard row; image vae_/vit_ sizes already match the configured transforms
    data_dir: str | None       # resolves image paths of shards written with --reference-images
    draw_key: int              # unique per draw within a stream: seeds CFG dropout and timesteps
