"""One image decoder for ingest, the trainer and inference (bagel-compat §4.1 pil_img2rgb, §4.2).

`load_image_rgb` turns stored bytes (or a referenced file) into an RGB PIL image; `image_to_tensor`
resizes it to a stored target size and normalises it to [-1, 1] exactly like upstream `ImageTransform`
(PIL bicubic resize, which antialiases, then ToTensor and Normalize(0.5, 0.5)).

Formats are pluggable: a decoder is a (sniff, decode) pair tried in registration order on the raw bytes,
with PIL as the fallback. Medical formats (DICOM, NIfTI) register themselves with `register_decoder`
and return any PIL image; the shared RGB conversion runs after every decoder.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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


def pil_img2rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparent pixels are composited over white (upstream `pil_img2rgb`).

    Upstream composites RGBA and images with a `transparency` entry; we also composite the other modes
    with an alpha band (LA, PA), where upstream's plain RGB conversion would expose whatever colour
    lies under transparent pixels.
    """
    if image.mode in ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")


def _pil_decode_draft(data: bytes, draft_size: tuple[int, int]) -> Image.Image:
    """PIL decode; a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps it at least
    `draft_size` in both sides (libjpeg scaled IDCT: far less work for large photos). Other formats as usual."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft(None, (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
    image.load()
    return image


def load_image_rgb(data: bytes | None, path: Path | str | None, meta: str | None = None, *,
                   draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode stored bytes, or read `path` when `data` is None, and return an RGB PIL image.

    `draft_size=(w, h)`: the largest size the caller will resize to. A JPEG at least twice as large in both
    sides is then decoded at a reduced DCT scale (never below `draft_size`): faster, but the pixels differ
    slightly from a full decode + resize (see docs/packing.md for the measured difference); None (default)
    decodes in full, as upstream does.
    """
    path = Path(path) if path is not None else None
    if data is None:
        if path is None:
            raise ImageDecodeError("no image bytes and no path: the shard row has neither")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    where = str(path) if path is not None else "stored bytes"
    for decoder in registered_decoders():
        if decoder.sniff(data, path):
            try:
                if draft_size is not None and decoder is PIL_DECODER:
                    image = _pil_decode_draft(data, draft_size)
                else:
                    image = decoder.decode(data, path, meta)
            except ImageDecodeError:
                raise
            except Exception as exc:  # decoders raise library-specific errors; report them uniformly
                raise ImageDecodeError(f"cannot decode image {where} with the {decoder.name} decoder: {exc}") from exc
            if image.mode == "RGB" and image.info.get("transparency") is None:
                return image   # freshly decoded and ours: no RGB copy (pil_img2rgb would convert = copy)
            return pil_img2rgb(image)
    raise ImageDecodeError(f"no decoder recognises image {where}")  # pragma: no cover - PIL accepts all


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[3, height, width] float32 in [-1, 1]: bicubic antialiased resize to the stored target, then
    (x / 255 - 0.5) / 0.5 as upstream ToTensor + Normalize."""
    if image.mode != "RGB":
        image = pil_img2rgb(image)
    return rgb_array_to_tensor(np.array(resize_rgb(image, width, height), dtype=np.uint8))  # one writable copy


def resize_rgb(image: Image.Image, width: int, height: int) -> Image.Image:
    """The upstream resize: PIL bicubic (antialiased) to the stored target; no-op at the right size."""
    if image.size != (width, height):
        image = image.resize((int(width), int(height)), Image.Resampling.BICUBIC)
    return image


def rgb_array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 (writable) -> [3, H, W] float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5).

    The one normalisation shared by the decode path and stored pixels (pipelines.imaging.pixels), so both give
    bit-identical tensors."""
    return normalise_(torch.from_numpy(array).permute(2, 0, 1).float())


def normalise_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: float pixel values 0..255 -> [-1, 1], with upstream's exact float ops (x / 255 - 0.5) / 0.5."""
    return tensor.div_(255).sub_(0.5).div_(0.5)


# Issue 7: referenced DICOM / NIfTI files (--reference-images shards) and 16-bit grey PNGs (keep_16bit),
# which PIL alone cannot read or would clip. Registered here so that every reader process has them.
from pipelines.imaging.medical import register_reader_decoders  # noqa: E402

register_reader_decoders()
