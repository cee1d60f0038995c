"""Glue between the medical readers and the rest of MedLoom: `decode_medical` picks the reader, and
`register_medical_imaging()` plugs the readers into the registries of the code that needs them:

- `pipelines.imaging.probe.HANDLERS` (ingest probing: DICOM, NIfTI, unusual PIL modes),
- `pipelines.imaging.decoders` (`load_image_rgb`: referenced DICOM / NIfTI files, 16-bit grey PNGs),
- `datasets_catalog.catalog.OPTION_VALIDATORS` (window, frame, slices, ... checked when a catalog loads),
- `datasets_catalog.records.REASONS` (the reject codes of the readers).

Those registries are owned by lower modules that know no medical format; the registration is an explicit
call, made by the ingest job before it loads a catalog, by every ingest chunk (Ray workers included) and by
`load_image_rgb`, and is a no-op after the first time in a process.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from datasets_catalog.catalog import register_option_validator
from datasets_catalog.records import REASONS
from pipelines.imaging import probe as image_io
from pipelines.imaging.decoders import ImageDecoder, register_decoder
from pipelines.imaging.dicom import decode_dicom
from pipelines.imaging.medical import (
    BAD_FRAME_RULE, DICOM_BURNED_IN, DICOM_DECODE_FAILED, DICOM_DECODER_MISSING, DICOM_INVALID, DICOM_NO_PIXELS,
    DICOM_UNSUPPORTED_PIXELS, DICOM_UNSUPPORTED_SYNTAX, NIFTI_INVALID, NIFTI_UNSUPPORTED, AXIS_NAMES, DecodedImage,
    IndexRule, MedicalImageError, MedicalOptions, is_medical, looks_like_dicom, looks_like_nifti, medical_format,
    validate_catalog_options,
)
from pipelines.imaging.nifti import decode_nifti
from pipelines.imaging.pixel_modes import WindowSpec, convert_unusual, header_mode_is_plain, needs_conversion

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


def decode_medical(data: bytes, path: Any = None, options: MedicalOptions | None = None) -> list[DecodedImage]:
    """Decode a DICOM or NIfTI file's bytes into display images by the options' rules.

    Raises MedicalImageError (reason + detail) for anything that cannot be ingested.
    """
    options = options or MedicalOptions()
    fmt = medical_format(data[:512], path)
    if fmt == "DICOM":
        return decode_dicom(data, options)
    if fmt == "NIFTI":
        return decode_nifti(data, options)
    raise MedicalImageError(DICOM_INVALID, f"{path or 'data'} is neither DICOM nor NIfTI")


_OPTIONS_CACHE: dict[tuple[str, str | None, int | None], MedicalOptions] = {}


def options_for(extra: dict[str, Any] | None, fmt: str | None, max_pixels: int | None = None) -> MedicalOptions:
    """MedicalOptions for one dataset's `extra_options` and a source format (cached: ingest calls this per
    image)."""
    key = (json.dumps(extra or {}, sort_keys=True, default=str), fmt, max_pixels)
    if key not in _OPTIONS_CACHE:
        _OPTIONS_CACHE[key] = MedicalOptions.from_mapping(extra or {}, max_pixels=max_pixels, fmt=fmt, strict=False)
    return _OPTIONS_CACHE[key]


def probe_medical(data: bytes, path: Any, context: Any):
    """image_io FormatHandler.probe for DICOM/NIfTI: decode by the dataset's rules, store PNG bytes.

    A rule that expands (frame: all, slices: every N, ...) returns the first image with `frames` holding
    one probe per frame/slice; ingest writes one row per frame.
    """
    fmt = medical_format(data[:512], path)
    try:
        options = options_for(getattr(context, "options", None), fmt, getattr(context, "max_pixels", None))
        images = decode_medical(data, path, options)
    except MedicalImageError as exc:
        raise image_io.ImageError(exc.reason, f"{path}: {exc.detail}") from None
    except ValueError as exc:  # options that only fail for this format's section
        raise image_io.ImageError(BAD_FRAME_RULE, f"{path}: {exc}") from None
    probes = [image_io.ImageProbe(i.width, i.height, i.format, i.png, i.sha256,
                                  {**i.meta, "frame_id": i.suffix} if i.suffix else i.meta) for i in images]
    if any(i.suffix for i in images):   # only an expanding frame/slice rule names its images
        first = probes[0]
        return image_io.ImageProbe(first.width, first.height, first.format, first.data, first.sha256, first.meta,
                                   frames=tuple(probes))
    return probes[0]


def probe_unusual_mode(data: bytes, path: Any, context: Any):
    """image_io handler for PIL formats: the built-in probe, then unusual modes are recorded in `meta`;
    16-bit / float grey is re-encoded as a plain PNG (readers would clip it), the others (LA, RGBA,
    P with transparency, CMYK, 1-bit) keep their bytes because every reader converts them the same way."""
    probe = image_io._pil_probe(data, path, context)
    if header_mode_is_plain(data):  # nearly every PNG/JPEG: decided from the header bytes, no PIL open
        return probe
    try:
        with Image.open(io.BytesIO(data)) as img:
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
    """load_image_rgb decoder: a referenced DICOM/NIfTI file shown as ingest recorded it (8-bit)."""
    parsed = json.loads(meta) if meta else None
    [first, *_] = decode_medical(data, path, options_from_meta(parsed))
    return Image.open(io.BytesIO(first.png))


def _png16_sniff(data: bytes, path: Any) -> bool:
    # PNG signature, IHDR first: bit depth at byte 24, colour type at byte 25 (0 = grey)
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 26 and data[24] == 16 and data[25] == 0


def _png16_decode(data: bytes, path: Any, meta: str | None):
    """16-bit grey PNG (keep_16bit) -> 8-bit L by the high byte; PIL's own RGB conversion would clip."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img, dtype=np.uint32)
    return Image.fromarray((arr >> 8).astype(np.uint8))


_registered = False


def register_medical_imaging() -> None:
    """Plug the medical readers into the probe, decoder, catalog-option and reject-reason registries (see the
    module doc). Idempotent and cheap after the first call, so every entry point may call it."""
    global _registered
    if _registered:
        return
    for code, text in REASON_TEXTS.items():
        REASONS.setdefault(code, text)
    register_option_validator(validate_catalog_options)
    # probe handlers in front of the built-in PIL one, tried in this order: DICOM, NIfTI, unusual PIL modes
    image_io.register_format(image_io.FormatHandler("pil_modes", image_io._pil_sniff, probe_unusual_mode),
                             first=True)
    image_io.register_format(image_io.FormatHandler("nifti", looks_like_nifti, probe_medical), first=True)
    image_io.register_format(image_io.FormatHandler("dicom", looks_like_dicom, probe_medical), first=True)
    register_decoder(ImageDecoder("png16", _png16_sniff, _png16_decode))
    register_decoder(ImageDecoder("medical", _reader_sniff, _reader_decode))
    _registered = True
