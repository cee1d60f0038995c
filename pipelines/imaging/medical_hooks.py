"""Glue between the medical readers and the rest of MedLoom: image_io format handlers (ingest), image_decode
readers (trainer, report, inference), the catalog's --keep-dicom-tags and the post-ingest leakage check.

Everything here is registered by name from other modules ("pipelines.imaging.medical:register_ingest_formats"
in image_io.EXTENSION_HOOKS, ...); `pipelines.imaging.medical` re-exports these names.
"""
from __future__ import annotations

import io
from typing import Any, Iterable

from pipelines.imaging.medical import (
    BAD_FRAME_RULE, DICOM_BURNED_IN, DICOM_DECODE_FAILED, DICOM_DECODER_MISSING, DICOM_INVALID, DICOM_NO_PIXELS,
    DICOM_UNSUPPORTED_PIXELS, DICOM_UNSUPPORTED_SYNTAX, NIFTI_INVALID, NIFTI_UNSUPPORTED, AXIS_NAMES, IndexRule,
    MedicalImageError, MedicalOptions, decode_medical, is_medical, looks_like_dicom, looks_like_nifti,
    medical_format, validate_dicom_keywords,
)
from pipelines.imaging.pixel_modes import WindowSpec

REASON_TEXTS = {
    DICOM_INVALID: "a DICOM file cannot be parsed or lacks image attributes",
    DICOM_NO_PIXELS: "a DICOM file holds no pixel data (report, structure set, ...)",
    DICOM_UNSUPPORTED_SYNTAX: "a DICOM transfer syntax has no decoder at all",
    DICOM_DECODER_MISSING: "a DICOM transfer syntax needs a decoder package that is not installed",
    DICOM_DECODE_FAILED: "the installed decoders failed on a DICOM file's pixel data",
    DICOM_BURNED_IN: "a DICOM has BurnedInAnnotation YES (text in the pixels) and the dataset does not allow it",
    DICOM_UNSUPPORTED_PIXELS: "a DICOM's photometric interpretation or window cannot be displayed",
    NIFTI_INVALID: "a NIfTI file cannot be parsed",
    NIFTI_UNSUPPORTED: "a NIfTI volume has an unsupported shape",
    BAD_FRAME_RULE: "the catalog's frame/slice/volume rule points outside the file",
}

_OPTIONS_CACHE: dict[tuple[str, str | None, int | None], MedicalOptions] = {}


def options_for(extra: dict[str, Any] | None, fmt: str | None, max_pixels: int | None = None) -> MedicalOptions:
    """MedicalOptions for one dataset's `extra_options` and a source format (cached: ingest calls this per
    image)."""
    import json

    key = (json.dumps(extra or {}, sort_keys=True, default=str), fmt, max_pixels)
    if key not in _OPTIONS_CACHE:
        _OPTIONS_CACHE[key] = MedicalOptions.from_mapping(extra or {}, max_pixels=max_pixels, fmt=fmt, strict=False)
    return _OPTIONS_CACHE[key]


def _register_reasons() -> None:
    from datasets_catalog.records import REASONS

    for code, text in REASON_TEXTS.items():
        REASONS.setdefault(code, text)


def probe_medical(data: bytes, path: Any, context: Any):
    """image_io FormatHandler.probe for DICOM/NIfTI: decode by the dataset's rules, store PNG bytes.

    A rule that expands (frame: all, slices: every N, ...) returns the first image with `frames` holding
    one probe per frame/slice; ingest writes one row per frame.
    """
    from pipelines.imaging.probe import ImageError, ImageProbe

    fmt = medical_format(data[:512], path)
    try:
        options = options_for(getattr(context, "options", None), fmt, getattr(context, "max_pixels", None))
        images = decode_medical(data, path, options)
    except MedicalImageError as exc:
        raise ImageError(exc.reason, f"{path}: {exc.detail}") from None
    except ValueError as exc:  # options that only fail for this format's section
        raise ImageError(BAD_FRAME_RULE, f"{path}: {exc}") from None
    probes = [ImageProbe(i.width, i.height, i.format, i.png, i.sha256, {**i.meta, "frame_id": i.suffix}
                         if i.suffix else i.meta) for i in images]
    if any(i.suffix for i in images):   # only an expanding frame/slice rule names its images
        first = probes[0]
        return ImageProbe(first.width, first.height, first.format, first.data, first.sha256, first.meta,
                          frames=tuple(probes))
    return probes[0]


def probe_unusual_mode(data: bytes, path: Any, context: Any):
    """image_io handler for PIL formats: the built-in probe, then unusual modes are recorded in `meta`;
    16-bit / float grey is re-encoded as a plain PNG (readers would clip it), the others (LA, RGBA,
    P with transparency, CMYK, 1-bit) keep their bytes because every reader converts them the same way."""
    import io as _io

    from PIL import Image

    from pipelines.imaging import probe as image_io
    from pipelines.imaging.pixel_modes import convert_unusual, header_mode_is_plain, needs_conversion

    probe = image_io._pil_probe(data, path, context)
    if header_mode_is_plain(data):  # nearly every PNG/JPEG: decided from the header bytes, no PIL open
        return probe
    try:
        with Image.open(_io.BytesIO(data)) as img:
            mode = img.mode
    except Exception:  # the built-in probe already accepted the header; keep its answer
        return probe
    if not needs_conversion(mode):
        return probe
    keep_16bit = bool((getattr(context, "options", None) or {}).get("keep_16bit", False))
    try:
        conv = convert_unusual(data, keep_16bit=keep_16bit)
    except Exception as exc:  # noqa: BLE001 - a file PIL cannot decode is corrupt
        raise image_io.ImageError("image_corrupt", f"{path} fails to decode ({exc}); re-export the file") from None
    if conv is None:
        return probe
    if conv.png is None:  # readers convert it themselves: keep the original bytes, record what they do
        return image_io.ImageProbe(probe.width, probe.height, probe.format, probe.data, probe.sha256, conv.meta,
                                   frames=probe.frames)
    return image_io.ImageProbe(conv.width, conv.height, probe.format, conv.png, probe.sha256, conv.meta)


def register_ingest_formats() -> None:
    """Put the DICOM / NIfTI / unusual-mode handlers in front of image_io's built-in PIL handler."""
    from pipelines.imaging import probe as image_io

    _register_reasons()
    image_io.register_format(image_io.FormatHandler("pil_modes", image_io._pil_sniff, probe_unusual_mode), first=True)
    image_io.register_format(image_io.FormatHandler("nifti", looks_like_nifti, probe_medical), first=True)
    image_io.register_format(image_io.FormatHandler("dicom", looks_like_dicom, probe_medical), first=True)


def options_from_meta(meta: dict[str, Any] | None) -> MedicalOptions:
    """Rebuild the display rules recorded in a shard image's `meta` (readers of referenced files)."""
    meta = meta or {}
    window = meta.get("window") or {}
    source = str(window.get("source") or "auto")
    if source in ("file", "file_voi_lut", "file_cal_range", "auto"):
        spec = WindowSpec()
    elif source in ("catalog",) and window.get("center") is not None:
        spec = WindowSpec.parse({"center": window["center"], "width": window["width"]})
    else:
        spec = WindowSpec.parse(source)
    frame = IndexRule(kind="indices", indices=(int(meta["frame"]),)) if "frame" in meta else IndexRule()
    slices = IndexRule(kind="indices", indices=(int(meta["slice"]),)) if "slice" in meta else IndexRule()
    axis = AXIS_NAMES.index(meta["plane"]) if meta.get("plane") in AXIS_NAMES else 2
    return MedicalOptions(window=spec, frame=frame, slices=slices, axis=axis, volume=int(meta.get("volume", 0)),
                          keep_16bit=False, allow_burned_in=True)


def _reader_sniff(data: bytes, path: Any) -> bool:
    return is_medical(data[:512], path)


def _reader_decode(data: bytes, path: Any, meta: str | None):
    """image_decode decoder: a referenced DICOM/NIfTI file shown as ingest recorded it (8-bit)."""
    import json

    from PIL import Image

    parsed = json.loads(meta) if meta else None
    [first, *_] = decode_medical(data, path, options_from_meta(parsed))
    return Image.open(io.BytesIO(first.png))


def _png16_sniff(data: bytes, path: Any) -> bool:
    # PNG signature, IHDR first: bit depth at byte 24, colour type at byte 25 (0 = grey)
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 26 and data[24] == 16 and data[25] == 0


def _png16_decode(data: bytes, path: Any, meta: str | None):
    """16-bit grey PNG (keep_16bit) -> 8-bit L by the high byte; PIL's own RGB conversion would clip."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img, dtype=np.uint32)
    return Image.fromarray((arr >> 8).astype(np.uint8))


def register_reader_decoders() -> None:
    """Teach pipelines.imaging.decode.load_image_rgb DICOM/NIfTI files and 16-bit grey PNGs."""
    from pipelines.imaging import decode as image_decode

    image_decode.register_decoder(image_decode.ImageDecoder("png16", _png16_sniff, _png16_decode))
    image_decode.register_decoder(image_decode.ImageDecoder("medical", _reader_sniff, _reader_decode))


def with_keep_dicom_tags(catalog: Any, keywords: Iterable[str]):
    """A copy of a `Catalog` whose datasets also keep these DICOM tags (jobs/ingest.py --keep-dicom-tags).
    The allow-list is part of each dataset's settings, so changing it rebuilds the datasets."""
    from dataclasses import replace

    extra = validate_dicom_keywords([k.strip() for k in keywords if k and k.strip()])
    if not extra:
        return catalog
    datasets = {}
    for name, spec in catalog.datasets.items():
        current = validate_dicom_keywords(spec.extra_options.get("keep_dicom_tags") or [])
        merged = list(validate_dicom_keywords([*current, *extra]))
        datasets[name] = replace(spec, extra_options={**spec.extra_options, "keep_dicom_tags": merged})
    return replace(catalog, datasets=datasets)


def ingest_leakage_check(out_dir: Any, report: Any = None) -> list[str]:
    """pipelines.ingest.driver POST_INGEST_CHECKS hook: warning lines (without the 'WARNING:' prefix) naming rows
    that share an image between a train and a validation/test dataset of the output folder."""
    from pipelines.report.scan import leakage_warnings

    lines = leakage_warnings(out_dir)
    if not lines:
        return []
    head = lines[0].removeprefix("WARNING: ")
    return [head, *(line.strip() for line in lines[1:])]
