"""DICOM -> display PNG with the standard display pipeline, and metadata without identifiers.

Order of operations (DICOM PS3.3 C.11 / PS3.4 N.2): stored values -> modality LUT (rescale slope and
intercept, or a Modality LUT) -> VOI (the file's VOI LUT or window, or a catalog preset/percentile) ->
presentation (MONOCHROME1 inverted so that air is dark) -> 8-bit (or 16-bit) grey. Colour images
(RGB, YBR_* decoded to RGB, PALETTE COLOR through its LUT) are brought to 8-bit RGB.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from pipelines.imaging.medical import (
    BAD_FRAME_RULE, DICOM_BURNED_IN, DICOM_DECODE_FAILED, DICOM_DECODER_MISSING, DICOM_INVALID,
    DICOM_NO_PIXELS, DICOM_UNSUPPORTED_PIXELS, DICOM_UNSUPPORTED_SYNTAX, IMAGE_TOO_LARGE, DecodedImage,
    MedicalImageError, MedicalOptions,
)
from pipelines.imaging.pixel_modes import (
    apply_window, encode_png, minmax_window, percentile_window, pixel_hash, scale_to_8bit, to_display,
    window_linear_exact,
)

# The only attributes copied into metadata by default: technical, never identifying.
SAFE_DICOM_FIELDS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "photometric_interpretation": "PhotometricInterpretation",
    "bits_stored": "BitsStored",
    "bits_allocated": "BitsAllocated",
    "pixel_representation": "PixelRepresentation",
    "view_position": "ViewPosition",
    "slice_thickness": "SliceThickness",
}


def _read(data: bytes):
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
            raise MedicalImageError(DICOM_INVALID, f"not a readable DICOM file ({exc})") from None


def _json_value(value: Any) -> Any:
    """DICOM element value -> JSON-safe (numbers stay numbers, multi-values become lists)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    try:
        f = float(value)  # DS / IS strings
        return int(f) if f.is_integer() and "." not in str(value) else f
    except (TypeError, ValueError):
        return str(value)


def _safe_meta(ds, options: MedicalOptions) -> dict[str, Any]:
    meta: dict[str, Any] = {"source_format": "DICOM"}
    for key, kw in SAFE_DICOM_FIELDS.items():
        value = ds.get(kw)
        if value is not None and value != "":
            meta[key] = _json_value(value)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None:
        meta["pixel_spacing"] = [float(v) for v in spacing]
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        meta["rescale"] = {"slope": float(slope if slope is not None else 1.0),
                           "intercept": float(intercept if intercept is not None else 0.0),
                           "type": str(ds.get("RescaleType", "")) or None}
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None:
        meta["transfer_syntax"] = ts.name
    if options.keep_dicom_tags:
        kept = {}
        for kw in options.keep_dicom_tags:
            if kw in ds:
                kept[kw] = _json_value(ds.data_element(kw).value)
        meta["dicom_tags"] = kept
    return meta


def _check_decodable(ds) -> None:
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise MedicalImageError(DICOM_INVALID, "the file meta has no Transfer Syntax UID; re-save the file with one")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:   # pydicom 3 raises for a syntax it has no decoder for (instead of None)
        decoder = None
    if decoder is None:
        raise MedicalImageError(DICOM_UNSUPPORTED_SYNTAX, f"no decoder exists for transfer syntax {ts.name} ({ts})")
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise MedicalImageError(
            DICOM_DECODER_MISSING,
            f"pixel data is {ts.name}; install a decoder for it ({missing}), e.g. pip install pylibjpeg "
            "pylibjpeg-libjpeg pylibjpeg-openjpeg",
        )


def _frame_array(ds, index: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pixel_array(ds, index=index, as_rgb=True)
        except Exception as exc:  # decoders raise many types; each becomes one clear reason
            from pydicom.pixels import get_decoder

            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = ts.name if ts is not None else "unknown transfer syntax"
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = "; ".join(lines[:3])[:300]
            decoder = get_decoder(ts) if ts is not None else None
            missing = "; ".join(decoder.missing_dependencies) if decoder is not None else ""
            hint = f"; another decoder may read it ({missing})" if missing else ""
            raise MedicalImageError(DICOM_DECODE_FAILED, f"could not decode the pixel data ({name}): {why}{hint}") from None


def _grey_display(ds, stored: np.ndarray, options: MedicalOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT -> VOI -> MONOCHROME1 inversion -> integers. Returns (pixels, window record)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out_max = 65535 if options.keep_16bit else 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = apply_modality_lut(stored, ds)
    spec = options.window
    window: dict[str, Any]
    if spec.kind in ("preset", "fixed"):
        shown = apply_window(values, spec.center, spec.width, "LINEAR", out_max)
        window = {"source": spec.describe() if spec.kind == "preset" else "catalog",
                  "center": spec.center, "width": spec.width, "function": "LINEAR"}
    elif spec.kind == "percentile":
        c, w = percentile_window(values, spec.lo, spec.hi)
        shown = window_linear_exact(values, c, w, out_max)
        window = {"source": spec.describe(), "center": c, "width": w, "function": "LINEAR_EXACT"}
    elif spec.kind == "auto" and ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        lut_out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        shown = np.asarray(lut_out, dtype=np.float64) * (out_max / float(2 ** bits - 1))
        window = {"source": "file_voi_lut", "lut_bits": bits,
                  "explanation": str(item.get("LUTExplanation", "")) or None}
    elif spec.kind == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
        center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        try:
            shown = apply_window(values, float(center), float(width), function, out_max)
        except ValueError as exc:
            raise MedicalImageError(DICOM_UNSUPPORTED_PIXELS, f"the file's window is unusable: {exc}") from None
        window = {"source": "file", "center": float(center), "width": float(width), "function": function}
    else:
        c, w = minmax_window(values)
        shown = window_linear_exact(values, c, w, out_max)
        window = {"source": "minmax", "center": c, "width": w, "function": "LINEAR_EXACT"}
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if inverted:
        shown = out_max - shown
    window["inverted"] = inverted
    return to_display(shown, options.keep_16bit), window


def _palette_lut(stored: np.ndarray, ds) -> np.ndarray:
    """pydicom's palette lookup; a table it cannot apply is a reject reason, not a traceback (an 8-bit LUT whose
    data is padded to an even length makes it ask numpy for a 'uint11' type, a missing table is a ValueError)."""
    from pydicom.pixels import apply_color_lut

    try:
        return apply_color_lut(stored, ds)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        table = f"descriptor {[int(v) for v in desc]}" if desc is not None else "no RedPaletteColorLookupTableDescriptor"
        raise MedicalImageError(
            DICOM_UNSUPPORTED_PIXELS,
            f"the PALETTE COLOR lookup table cannot be applied ({table}); convert the file to RGB "
            f"(pydicom: {type(exc).__name__}: {exc})",
        ) from None


def _colour_display(ds, stored: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = _palette_lut(stored, ds)
        if rgb.dtype.itemsize > 1:  # 16-bit LUT entries: keep the high byte (0xFF00 -> 255)
            rgb = (np.asarray(rgb, dtype=np.uint32) >> 8).astype(np.uint8)
        return np.asarray(rgb, dtype=np.uint8), {"color": "PALETTE COLOR->RGB (palette LUT)"}
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise MedicalImageError(DICOM_UNSUPPORTED_PIXELS, f"unsupported pixel layout {stored.shape} for {photometric}")
    bits = int(ds.get("BitsStored", 8) or 8)
    note = "RGB" if photometric == "RGB" else f"{photometric}->RGB"
    if bits > 8:
        note += f" ({bits}-bit scaled to 8-bit)"
    return scale_to_8bit(stored, bits), {"color": note}


def decode_dicom(data: bytes, options: MedicalOptions | None = None) -> list[DecodedImage]:
    """Decode a DICOM file's bytes by the options' frame rule; see the module docstring for the pipeline."""
    options = options or MedicalOptions()
    ds = _read(data)
    if "PixelData" not in ds:
        kind = "FloatPixelData" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no pixel data"
        raise MedicalImageError(DICOM_NO_PIXELS, f"the file has {kind} (e.g. a report or structure set); "
                                                 "only image DICOMs can be ingested")
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not options.allow_burned_in:
        raise MedicalImageError(
            DICOM_BURNED_IN,
            "BurnedInAnnotation is YES: text (possibly patient details) is burned into the pixels; "
            "set allow_burned_in: true for this dataset only if you have checked the images",
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MedicalImageError(DICOM_INVALID, f"image attributes are missing or malformed ({exc})") from None
    if rows <= 0 or cols <= 0:
        raise MedicalImageError(DICOM_INVALID, f"the image is {cols}x{rows} pixels")
    if options.max_pixels is not None and rows * cols > options.max_pixels:
        raise MedicalImageError(
            IMAGE_TOO_LARGE, f"{cols}x{rows} = {rows * cols} pixels is over the cap of {options.max_pixels}"
        )
    _check_decodable(ds)
    try:
        frames = options.frame.select(max(n_frames, 1))
    except IndexError as exc:
        raise MedicalImageError(BAD_FRAME_RULE, f"frame rule {options.frame.describe()}: {exc}") from None
    base = _safe_meta(ds, options)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    out: list[DecodedImage] = []
    for idx in frames:
        stored = _frame_array(ds, idx if n_frames > 1 else None)
        if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2", ""):
            pixels, extra = _grey_display(ds, stored, options)
            meta = {**base, "window": extra}
        elif samples == 1 and photometric != "PALETTE COLOR":
            raise MedicalImageError(DICOM_UNSUPPORTED_PIXELS, f"photometric interpretation {photometric!r} is not supported")
        else:
            pixels, extra = _colour_display(ds, stored)
            meta = {**base, **extra}
            if options.keep_16bit:
                meta["note"] = "keep_16bit applies to greyscale only; colour is stored as 8-bit RGB"
        png, mode = encode_png(pixels)
        meta["output_mode"] = mode
        if n_frames > 1:
            meta["frame"] = idx
            meta["num_frames"] = n_frames
        out.append(DecodedImage(
            png=png, width=int(pixels.shape[1]), height=int(pixels.shape[0]), mode=mode, format="DICOM",
            sha256=pixel_hash(stored), meta=meta, index=idx if n_frames > 1 else None,
            suffix=f"f{idx}" if options.frame.expands and n_frames > 1 else None,
        ))
    return out
