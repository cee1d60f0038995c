"""The format decoders `pipelines.imaging.decode.load_image_rgb` tries: (sniff, decode) pairs, newest first,
PIL last.

A registry of its own, without torch, so that format readers (DICOM, NIfTI, 16-bit PNG: see
`pipelines.imaging.medical_hooks`) can register from any process, an ingest worker included, without
importing the tensor code in `decode` and without `decode` importing them at start-up.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image


class ImageDecodeError(ValueError):
    """An image that cannot be read or decoded; the message names the file."""


@dataclass(frozen=True)
class ImageDecoder:
    name: str
    sniff: Callable[[bytes, Path | None], bool]                       # (raw bytes, path or None) -> mine?
    decode: Callable[[bytes, Path | None, str | None], Image.Image]   # (raw bytes, path, meta JSON) -> image


def _pil_sniff(data: bytes, path: Path | None) -> bool:
    return True


def _pil_decode(data: bytes, path: Path | None, meta: str | None) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


PIL_DECODER = ImageDecoder("pil", _pil_sniff, _pil_decode)
_DECODERS: list[ImageDecoder] = []


def register_decoder(decoder: ImageDecoder) -> None:
    """Add a format decoder, tried before the ones registered earlier and before PIL (re-registering a
    name replaces it)."""
    _DECODERS[:] = [d for d in _DECODERS if d.name != decoder.name]
    _DECODERS.insert(0, decoder)


def unregister_decoder(name: str) -> None:
    """Remove a registered decoder (PIL, the fallback, cannot be removed)."""
    _DECODERS[:] = [d for d in _DECODERS if d.name != name]


def registered_decoders() -> list[ImageDecoder]:
    return [*_DECODERS, PIL_DECODER]
