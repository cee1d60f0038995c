"""Small helpers shared by jobs/vqa.py and jobs/generate.py: transform flags, atomic PNG/latent writes and
the user-error guard (one line on stderr, exit 2, no traceback)."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from datasets_catalog.transforms import ImageTransformArgs
from pipelines.storage.uris import write_bytes_atomic

from .loading import InferenceError


def format_transform(args: ImageTransformArgs) -> str:
    """ImageTransformArgs -> 'MAX,MIN,STRIDE,MAX_PIXELS' (what `parse_transform` reads; flag defaults)."""
    return f"{args.max_image_size},{args.min_image_size},{args.image_stride},{args.max_pixels}"


def parse_transform(text: str, flag: str) -> ImageTransformArgs:
    """'MAX,MIN,STRIDE[,MAX_PIXELS]' -> ImageTransformArgs (upstream ImageTransform argument order)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise InferenceError(f"{flag} {text!r}: expected MAX,MIN,STRIDE[,MAX_PIXELS] as integers") from None
    if len(parts) not in (3, 4):
        raise InferenceError(f"{flag} {text!r}: expected 3 or 4 comma-separated integers MAX,MIN,STRIDE[,MAX_PIXELS]")
    try:
        return ImageTransformArgs(*parts)
    except ValueError as exc:
        raise InferenceError(f"{flag} {text!r}: {exc}") from None


def save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def save_latent(latent: torch.Tensor, height: int, width: int, path: Path) -> Path:
    """The sampled latent tokens [h*w, p*p*z] the image was decoded from, with its pixel size."""
    from safetensors.torch import save

    data = save({"latent": latent.contiguous().cpu()}, metadata={"height": str(height), "width": str(width)})
    write_bytes_atomic(Path(path), data)
    return Path(path)


def exit_status(job: Callable[[Optional[list[str]]], int], argv: Optional[list[str]]) -> int:
    """Run a job body: a user mistake is one `error:` line and status 2 (never a traceback), Ctrl-C is 130."""
    try:
        return job(argv)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def wants_batch(input_path: object, output_path: object) -> bool:
    """Batch mode reads --input and writes --output; one without the other is a user mistake."""
    if (input_path is None) != (output_path is None):
        raise InferenceError("batch mode needs both --input FILE.jsonl and --output FILE.jsonl")
    return input_path is not None
