"""Pixel-level helpers shared by the DICOM, NIfTI and PNG/TIFF paths: windowing, bit-depth
reduction, lossless PNG encoding and the conversion of unusual PIL modes.

Why one module: every medical source ends as "a float array of intensities -> a display window ->
8-bit (or 16-bit) grey, or RGB -> PNG". Doing that in one place keeps the three readers consistent
and makes the window that was used easy to record next to the pixels.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.imaging.probe import jpeg_sof_offset

# Display windows in Hounsfield units (centre, width): the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}

# Modes that every consumer already reads as-is; anything else is converted (and the conversion recorded).
PLAIN_MODES = frozenset({"L", "RGB"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


@dataclass(frozen=True)
class WindowSpec:
    """How intensities become display values.

    kind: "auto" (the file's own VOI LUT / window, else min-max), "minmax", "percentile" (lo, hi in
    percent), "preset" (a name from WINDOW_PRESETS) or "fixed" (explicit centre/width).
    """

    kind: str = "auto"
    name: str | None = None
    center: float | None = None
    width: float | None = None
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def parse(cls, value: Any) -> "WindowSpec":
        """Parse a catalog value: None, "auto", "file", "minmax", a preset name, "percentile:1,99",
        "40/400" (centre/width) or a mapping {center: 40, width: 400}. Raises ValueError with a hint."""
        if value is None:
            return cls()
        if isinstance(value, WindowSpec):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"center", "width"}
            if unknown or "center" not in value or "width" not in value:
                raise ValueError(f"window mapping needs exactly 'center' and 'width', got {sorted(value)}")
            return cls._fixed(value["center"], value["width"])
        if not isinstance(value, str):
            raise ValueError(f"window must be a string or a {{center, width}} mapping, got {value!r}")
        text = value.strip().lower()
        if text in ("auto", "file", ""):
            return cls()
        if text == "minmax":
            return cls(kind="minmax")
        if text in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[text]
            return cls(kind="preset", name=text, center=c, width=w)
        if text.startswith("percentile"):
            rest = text[len("percentile"):].lstrip(":= ")
            parts = [p for p in rest.replace(" ", ",").split(",") if p]
            try:
                lo, hi = (float(p) for p in parts)
            except ValueError:
                raise ValueError(f"window {value!r}: write percentile:LO,HI, e.g. percentile:1,99") from None
            if not (0.0 <= lo < hi <= 100.0):
                raise ValueError(f"window {value!r}: need 0 <= LO < HI <= 100")
            return cls(kind="percentile", lo=lo, hi=hi)
        if "/" in text:
            c, _, w = text.partition("/")
            try:
                center, width = float(c), float(w)
            except ValueError:
                raise ValueError(f"window {value!r}: write CENTER/WIDTH, e.g. 40/400") from None
            return cls._fixed(center, width)   # outside the try: its precise message (width >= 1) is kept
        raise ValueError(
            f"unknown window {value!r}; use auto, minmax, percentile:LO,HI, CENTER/WIDTH or a preset: "
            + ", ".join(sorted(WINDOW_PRESETS))
        )

    @classmethod
    def _fixed(cls, center: Any, width: Any) -> "WindowSpec":
        try:
            c, w = float(center), float(width)
        except (TypeError, ValueError):
            raise ValueError(f"window center/width must be numbers, got {center!r}/{width!r}") from None
        if not np.isfinite(c) or not np.isfinite(w) or w < 1:
            raise ValueError(f"window width must be a finite number >= 1, got {width!r}")
        return cls(kind="fixed", center=c, width=w)

    def describe(self) -> str:
        if self.kind == "preset":
            return str(self.name)
        if self.kind == "percentile":
            return f"percentile:{self.lo:g},{self.hi:g}"
        if self.kind == "fixed":
            return f"{self.center:g}/{self.width:g}"
        return self.kind


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
                 out_max: int = 255) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing of `values` onto 0..out_max (float64, not yet rounded).

    Written out here (not pydicom's apply_voi_lut) so that presets and percentile windows on NIfTI use
    the same formula, and so that the tests can check it against pydicom independently.
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError("SIGMOID window width must be > 0")
        with np.errstate(over="ignore"):  # exp overflow -> inf -> 0: the correct limit
            return out_max / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise ValueError("LINEAR window width must be >= 1")
        c, w = center - 0.5, width - 1.0
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("LINEAR_EXACT window width must be > 0")
        c, w = center, width
    else:
        raise ValueError(f"unsupported VOI LUT function {function!r}")
    if w <= 0:  # LINEAR with width exactly 1: a hard threshold
        return np.where(x <= c, 0.0, float(out_max))
    out = ((x - c) / w + 0.5) * out_max
    out = np.where(x <= c - w / 2, 0.0, out)
    out = np.where(x > c + w / 2, float(out_max), out)
    return out


def minmax_window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) spanning the finite values; width at least 1 so flat images stay valid."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo + hi) / 2.0, max(hi - lo, 1.0)


def percentile_window(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    a, b = (float(v) for v in np.percentile(finite, [lo, hi]))
    return (a + b) / 2.0, max(b - a, 1.0)


def window_linear_exact(values: np.ndarray, center: float, width: float, out_max: int) -> np.ndarray:
    """Map [center - width/2, center + width/2] linearly onto 0..out_max (used for data-derived windows)."""
    return apply_window(values, center, width, "LINEAR_EXACT", out_max)


def to_display(values: np.ndarray, keep_16bit: bool) -> np.ndarray:
    """Round windowed floats (0..255 or 0..65535) to the output integer type."""
    out_max = 65535 if keep_16bit else 255
    arr = np.clip(np.rint(np.nan_to_num(values, nan=0.0)), 0, out_max)
    return arr.astype(np.uint16 if keep_16bit else np.uint8)


def scale_to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Linear rescale of integer samples with `bits` significant bits to 0..255 (colour > 8 bit)."""
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    top = float(2 ** bits - 1)
    return to_display(np.asarray(arr, dtype=np.float64) * (255.0 / top), keep_16bit=False)


def encode_png(arr: np.ndarray) -> tuple[bytes, str]:
    """Losslessly encode a 2-D uint8/uint16 grey or HxWx3 uint8 RGB array as PNG; returns (bytes, mode).

    No text chunks are written, so nothing but pixels (and the size) leaves this function.
    """
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2 and arr.dtype == np.uint8:
        img = Image.fromarray(arr)  # mode L
    elif arr.ndim == 2 and arr.dtype == np.uint16:
        img = Image.fromarray(arr)  # mode I;16: a 16-bit greyscale PNG
    elif arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        img = Image.fromarray(arr)
    else:
        raise ValueError(f"cannot encode array of shape {arr.shape} and dtype {arr.dtype} as PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), img.mode


def pixel_hash(arr: np.ndarray) -> str:
    """sha256 of decoded source pixels (shape, dtype, values): the same scan re-exported with another
    header, window or container still hashes the same, which is what duplicate/leakage checks need."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{a.shape}|{a.dtype.newbyteorder('<').str}|".encode())
    h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ModeConversion:
    """What an unusual PNG/TIFF becomes: `png` holds new bytes when the pixels had to be rewritten at
    ingest (high bit depth), or None when the original bytes are kept because every reader's decoder
    (`pil_img2rgb`) already converts them this way; `meta` records the conversion either way."""

    png: bytes | None
    width: int
    height: int
    mode: str
    meta: dict[str, Any]


# Modes whose pixels are rewritten at ingest: PIL's RGB conversion would clip them to 0..255 (white).
REWRITTEN_MODES = SIXTEEN_BIT_MODES | {"F", "I;32", "I;32B", "I;32L"}


def decode_time_conversion(mode: str, info: dict[str, Any]) -> tuple[str, str]:
    """(output mode, description) of what `pil_img2rgb` does to a mode it reads as-is."""
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or info.get("transparency") is not None:
        return "RGB", f"{mode}{' with transparency' if mode in ('P', 'L', 'RGB') else ''}->RGB " \
                      "(alpha composited over white at decode time, as upstream pil_img2rgb)"
    if mode == "P":
        return "RGB", "P->RGB (palette expanded at decode time)"
    if mode == "CMYK":
        return "RGB", "CMYK->RGB (PIL's naive formula, no ICC profile, at decode time)"
    return "RGB", f"{mode}->RGB (at decode time)"


def convert_pil_image(img: Image.Image, keep_16bit: bool = False) -> tuple[Image.Image, str | None]:
    """Bring any PIL mode to L, RGB (or I;16 when keep_16bit); returns (image, description or None).

    Rules (predictable, recorded): 1 -> L; 16/32-bit grey and float -> min-max window to L (or I;16);
    LA / RGBA / PA / P-with-transparency -> alpha composited over white; CMYK/YCbCr/LAB/HSV -> RGB
    (CMYK without ICC profile, i.e. PIL's naive formula).
    """
    mode = img.mode
    if mode in PLAIN_MODES:
        return img, None
    if mode == "1":
        return img.convert("L"), "1->L"
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        center, width = minmax_window(arr)
        lo, hi = center - width / 2, center + width / 2
        if keep_16bit and mode != "F":
            out = to_display(window_linear_exact(arr, center, width, 65535), keep_16bit=True)
            return Image.fromarray(out), f"{mode}->I;16 (min-max {lo:g}..{hi:g} stretched to 0..65535)"
        out = to_display(window_linear_exact(arr, center, width, 255), keep_16bit=False)
        return Image.fromarray(out), f"{mode}->L (min-max {lo:g}..{hi:g} stretched to 0..255)"
    if mode in ("LA", "La"):
        rgba = img.convert("RGBA")
        return _over_white(rgba).convert("L"), f"{mode}->L (alpha composited over white)"
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return _over_white(rgba), f"{mode}{' with transparency' if mode == 'P' else ''}->RGB (alpha composited over white)"
    if mode == "P":
        return img.convert("RGB"), "P->RGB (palette expanded)"
    if mode == "CMYK":
        return img.convert("RGB"), "CMYK->RGB (naive, no ICC profile)"
    if mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB"), f"{mode}->RGB"
    try:
        return img.convert("RGB"), f"{mode}->RGB"
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert PIL mode {mode!r}: {exc}") from exc


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def pil_img2rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparent pixels are composited over white (upstream `pil_img2rgb`).

    Upstream composites RGBA and images with a `transparency` entry; we also composite the other modes
    with an alpha band (LA, PA), where upstream's plain RGB conversion would expose whatever colour
    lies under transparent pixels. Every reader (`pipelines.imaging.decode.load_image_rgb`) ends with it.
    """
    if image.mode in ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    """Transparent pixels over white: the readers' own conversion, so ingest and training agree."""
    return pil_img2rgb(rgba)


def needs_conversion(mode: str) -> bool:
    return mode not in PLAIN_MODES


def convert_unusual(data: bytes, keep_16bit: bool = False) -> ModeConversion | None:
    """Describe, and where needed rewrite, an image whose mode is not L/RGB; None if it is plain.

    High-bit-depth grey and float images are re-encoded as a plain PNG (min-max stretched to 8 bit, or to
    16 bit with keep_16bit): readers would otherwise clip them. Other modes (alpha, palette, CMYK, 1-bit)
    keep their original bytes, and `meta` records the conversion every reader applies when decoding.
    Multi-page TIFFs: page 0 is used (recorded).
    """
    with Image.open(io.BytesIO(data)) as img:
        if not needs_conversion(img.mode):
            return None
        n_frames = getattr(img, "n_frames", 1)
        source_format, source_mode, info = img.format, img.mode, dict(img.info)
        meta: dict[str, Any] = {"source_format": source_format, "source_mode": source_mode}
        if n_frames > 1:
            meta["pages"] = n_frames
            meta["page_used"] = 0
        if source_mode not in REWRITTEN_MODES:
            out_mode, conversion = decode_time_conversion(source_mode, info)
            meta.update(conversion=conversion, output_mode=out_mode)
            return ModeConversion(png=None, width=img.width, height=img.height, mode=out_mode, meta=meta)
        img.seek(0)
        img.load()
        out, conversion = convert_pil_image(img, keep_16bit=keep_16bit)
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=6)
    meta.update(conversion=conversion, output_mode=out.mode)
    return ModeConversion(png=buf.getvalue(), width=out.width, height=out.height, mode=out.mode, meta=meta)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_components(data: bytes) -> int | None:
    """Number of colour components from the first SOF segment (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK)."""
    pos = jpeg_sof_offset(data)
    return data[pos + 9] if pos is not None and pos + 9 < len(data) else None


def header_mode_is_plain(data: bytes) -> bool | None:
    """From header bytes only (no PIL open, which costs ~0.4 ms): True when the image decodes as plain L or
    RGB (8-bit grey/RGB PNG, 1- or 3-component JPEG), False when it needs a conversion, None when unknown."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 26 and data[12:16] == b"IHDR":
        return (data[24], data[25]) in ((8, 0), (8, 2))   # (bit depth, colour type): 8-bit grey or RGB
    if data.startswith(b"\xff\xd8\xff"):
        n = _jpeg_components(data)
        return None if n is None else n in (1, 3)
    return None
