"""The `"inference"` record a checkpoint's training_args.json carries: the image transforms each dataset of
the mixture was trained at, and per role (VQA, generation) the default inference uses
(model/inference/defaults.py reads it)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from datasets_catalog.transforms import ImageTransformArgs
from model.inference.defaults import TrainedTransforms, record_for
from pipelines.mixture.config import MixtureConfig, MixtureConfigError


def _built(manifest: dict) -> tuple[Optional[ImageTransformArgs], Optional[ImageTransformArgs]]:
    """The transforms the shards were ingested with (their _manifest.json)."""
    t = manifest.get("transforms") or {}
    vae, vit = t.get("image_transform_args") or t.get("vae"), t.get("vit_image_transform_args") or t.get("vit")
    try:
        return (ImageTransformArgs(**vae) if vae else None, ImageTransformArgs(**vit) if vit else None)
    except (TypeError, ValueError):
        return None, None


def inference_record(mixture: MixtureConfig) -> Optional[dict[str, Any]]:
    """The record for this mixture, with the transforms the stream trains at: the shards' own, or the
    config's where it overrides them (pipelines/mixture/sources.py). None when the mixture does not resolve
    (the stream itself reports why)."""
    from pipelines.mixture.sources import resolve_sources

    logger = logging.getLogger("pipelines.mixture.sources")
    level = logger.level
    logger.setLevel(logging.ERROR)   # the stream logs the same notes; say them once
    try:
        resolved = resolve_sources(mixture)
    except MixtureConfigError:
        return None
    finally:
        logger.setLevel(level)
    seen: dict[str, TrainedTransforms] = {}
    for group in resolved.groups:
        for ds in group.datasets:
            vae, vit = ds.recompute or _built(ds.manifest)
            if ds.name not in seen and vae is not None and vit is not None:
                seen[ds.name] = TrainedTransforms(ds.name, ds.task, vae, vit)
    return record_for(list(seen.values()))
