"""One image decoder for ingest, the trainer and inference (docs/upstream-compat.md#image-decode, #resize-rule).

`load_image_rgb` turns stored bytes (or a referenced file) into an RGB PIL image; `image_to_tensor`
resizes it to a stored target size and normalises it to [-1, 1] exactly like upstream `ImageTransform`
(PIL bicubic resize, which antialiases, then ToTensor and Normalize(0.5, 0.5)).

Formats are pluggable: a decoder is a (sniff, decode) pair (`pipelines.imaging.decoders`) tried in
registration order on the raw bytes, with PIL as the fallback. The medical readers (DICOM, NIfTI, 16-bit
grey PNG) are registered by `register_medical_imaging()`, which `load_image_rgb` calls (a no-op after the
first time), so every process that decodes has them: trainer, loader workers, report, inference. A decoder
returns any PIL image; the shared RGB conversion (`pil_img2rgb`) runs after every decoder.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.imaging.decoders import ImageDecodeError, PIL_DECODER, registered_decoders
from pipelines.imaging.medical_hooks import register_medical_imaging
from pipelines.imaging.pixel_modes import pil_img2rgb


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
    register_medical_imaging()   # once per process: DICOM / NIfTI / 16-bit PNG readers (referenced files)
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
