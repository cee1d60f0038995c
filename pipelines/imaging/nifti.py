"""NIfTI volume -> display slices in radiological convention.

The volume is first brought to the closest canonical (RAS+) orientation (axis swaps and flips only, no
resampling). A slice taken along axis 0/1/2 (sagittal/coronal/axial) is then shown the way radiologists
read it: axial and coronal with the patient's right on the viewer's left, anterior (axial) or superior
(coronal, sagittal) at the top, sagittal with anterior on the left.
Intensities use one window for the whole volume so that slices of one scan are comparable.
"""
from __future__ import annotations

import gzip
import zlib
from typing import Any

import numpy as np

from pipelines.imaging.medical import (
    BAD_FRAME_RULE, IMAGE_TOO_LARGE, NIFTI_INVALID, NIFTI_UNSUPPORTED, AXIS_NAMES, DecodedImage,
    MedicalImageError, MedicalOptions,
)
from pipelines.imaging.pixel_modes import (
    apply_window, encode_png, percentile_window, pixel_hash, to_display, window_linear_exact, minmax_window,
)

AUTO_PERCENTILES = (0.5, 99.5)


def _load(data: bytes):
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as exc:
        raise MedicalImageError(NIFTI_INVALID, f"corrupt gzip stream ({exc})") from None
    if len(raw) < 348:
        raise MedicalImageError(NIFTI_INVALID, "file is shorter than a NIfTI header")
    is_v2 = raw[4:8] == b"n+2\x00"
    klass = nib.Nifti2Image if is_v2 else nib.Nifti1Image
    try:
        img = klass.from_bytes(raw)
        return nib.as_closest_canonical(img), img
    except Exception as exc:  # nibabel raises several types for bad headers / short data
        raise MedicalImageError(NIFTI_INVALID, f"not a readable single-file NIfTI ({type(exc).__name__}: {exc})") from None


def radiological(slice_2d: np.ndarray) -> np.ndarray:
    """A slice of a RAS+ volume (first remaining axis = columns) shown in radiological orientation."""
    return np.ascontiguousarray(slice_2d.T[::-1, ::-1])


def decode_nifti(data: bytes, options: MedicalOptions | None = None) -> list[DecodedImage]:
    """Decode a .nii / .nii.gz into display slices by the options' slice rule and window."""
    import nibabel as nib

    options = options or MedicalOptions()
    canonical, original = _load(data)
    shape = canonical.shape
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
        raise MedicalImageError(NIFTI_UNSUPPORTED, f"volumes of shape {canonical.shape} are not supported (at most 4-D)")
    if len(shape) == 4 and options.volume >= shape[3]:
        raise MedicalImageError(BAD_FRAME_RULE, f"volume {options.volume} requested but the file has {shape[3]}")
    try:
        if len(canonical.shape) == 4:
            vol = np.asarray(canonical.dataobj[..., options.volume], dtype=np.float64)
        else:
            vol = np.asarray(canonical.dataobj, dtype=np.float64).reshape(shape)
    except Exception as exc:
        raise MedicalImageError(NIFTI_INVALID, f"could not read the voxel data ({exc})") from None
    axis = options.axis
    plane = [a for a in range(3) if a != axis]
    height, width = shape[plane[1]], shape[plane[0]]
    if options.max_pixels is not None and width * height > options.max_pixels:
        raise MedicalImageError(IMAGE_TOO_LARGE, f"{width}x{height} slices are over the cap of {options.max_pixels} pixels")
    try:
        slices = options.slices.select(shape[axis])
    except IndexError as exc:
        raise MedicalImageError(BAD_FRAME_RULE, f"slice rule {options.slices.describe()}: {exc}") from None

    out_max = 65535 if options.keep_16bit else 255
    spec = options.window
    header = canonical.header
    if spec.kind in ("preset", "fixed"):
        window: dict[str, Any] = {"source": spec.describe() if spec.kind == "preset" else "catalog",
                                  "center": spec.center, "width": spec.width, "function": "LINEAR"}
        show = lambda v: apply_window(v, spec.center, spec.width, "LINEAR", out_max)  # noqa: E731
    else:
        cal_min, cal_max = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
        if spec.kind == "auto" and cal_max > cal_min:
            c, w, source = (cal_min + cal_max) / 2, cal_max - cal_min, "file_cal_range"
        elif spec.kind == "minmax":
            c, w = minmax_window(vol)
            source = "minmax"
        else:
            lo, hi = (spec.lo, spec.hi) if spec.kind == "percentile" else AUTO_PERCENTILES
            c, w = percentile_window(vol, lo, hi)
            source = f"percentile:{lo:g},{hi:g}"
        window = {"source": source, "center": c, "width": w, "function": "LINEAR_EXACT", "scope": "volume"}
        show = lambda v: window_linear_exact(v, c, w, out_max)  # noqa: E731

    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    base: dict[str, Any] = {
        "source_format": "NIFTI",
        "nifti_version": 2 if isinstance(original, nib.Nifti2Image) else 1,
        "source_axcodes": "".join(nib.aff2axcodes(original.affine)),
        "orientation": "radiological (closest canonical RAS, no resampling)",
        "plane": AXIS_NAMES[axis],
        "num_slices": int(shape[axis]),
        "pixel_spacing": [zooms[plane[1]], zooms[plane[0]]],  # [row spacing, column spacing] as in DICOM
        "slice_spacing": zooms[axis],
        "datatype": str(original.get_data_dtype()),
        "window": window,
    }
    if len(canonical.shape) == 4:
        base["volume"] = options.volume
        base["num_volumes"] = int(shape[3])
    images: list[DecodedImage] = []
    for k in slices:
        raw = np.take(vol, k, axis=axis)
        pixels = to_display(show(radiological(raw)), options.keep_16bit)
        png, mode = encode_png(pixels)
        images.append(DecodedImage(
            png=png, width=int(pixels.shape[1]), height=int(pixels.shape[0]), mode=mode, format="NIFTI",
            sha256=pixel_hash(raw), meta={**base, "slice": int(k), "output_mode": mode}, index=int(k),
            suffix=f"s{k}" if options.slices.expands else None,
        ))
    return images
