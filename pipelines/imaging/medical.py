"""Medical image sources (DICOM, NIfTI) turned into what a shard stores: lossless PNG + safe metadata.

This module holds what the readers (`pipelines.imaging.dicom`, `pipelines.imaging.nifti`) and their users
share, and nothing that needs a reader: `is_medical()` (sniff), `MedicalOptions.from_mapping()` (the
catalog options, validated), `DecodedImage` (what a reader returns) and `MedicalImageError` (a stable
`reason` code plus a sentence a person can act on). `pipelines.imaging.medical_hooks.decode_medical()`
(bytes -> one or more `DecodedImage`) picks the reader.

No patient or institution identifier ever reaches `DecodedImage.meta`: the metadata is built from a
fixed list of technical attributes (`SAFE_DICOM_FIELDS`), plus only the tags a user allow-lists
explicitly with `keep_dicom_tags`.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterable

from pipelines.imaging.pixel_modes import WindowSpec

# Stable reason codes (they land in _rejects.parquet `reason`).
DICOM_INVALID = "dicom_invalid"
DICOM_NO_PIXELS = "dicom_no_pixels"
DICOM_UNSUPPORTED_SYNTAX = "dicom_unsupported_syntax"
DICOM_DECODER_MISSING = "dicom_decoder_missing"
DICOM_DECODE_FAILED = "dicom_decode_failed"
DICOM_BURNED_IN = "dicom_burned_in_annotation"
DICOM_UNSUPPORTED_PIXELS = "dicom_unsupported_pixels"
NIFTI_INVALID = "nifti_invalid"
NIFTI_UNSUPPORTED = "nifti_unsupported"
IMAGE_TOO_LARGE = "image_too_large"
BAD_FRAME_RULE = "frame_out_of_range"

# DICOM keywords that identify a person, an institution or a device: never copied unless allow-listed
# (and even then the docs warn). Only documentation + a guard for the allow-list: the metadata is built
# from an allow-list, not by deleting these.
IDENTIFYING_KEYWORDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames",
    "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "StationName", "DeviceSerialNumber", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "IssuerOfPatientID",
})

_EXPANDING = ("all", "every", "indices")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class IndexRule:
    """Which frames (DICOM) or slices (NIfTI) to keep: middle | first | last | all | every N | indices.

    `all`, `every N` and `indices` expand one record into one record per kept frame/slice.
    """

    kind: str = "middle"
    step: int = 1
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any, what: str = "frame") -> "IndexRule":
        if value is None:
            return cls()
        if isinstance(value, IndexRule):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(kind="indices", indices=(value,))
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{what}: the list of indices is empty")
            return cls(kind="indices", indices=tuple(_as_int(v, f"{what} index") for v in value))
        if isinstance(value, dict):
            if set(value) == {"every"}:
                return cls._every(value["every"], what)
            if set(value) == {"indices"}:
                return cls.parse(list(value["indices"]) if isinstance(value["indices"], (list, tuple))
                                 else value["indices"], what)
            raise ValueError(f"{what}: a mapping must be {{every: N}} or {{indices: [...]}}, got {sorted(value)}")
        if not isinstance(value, str):
            raise ValueError(f"{what} must be middle, first, last, all, 'every N', 'indices:1,2' or a list")
        text = value.strip().lower()
        if text in ("middle", "first", "last", "all"):
            return cls(kind=text)
        if text.startswith("every"):
            return cls._every(text[len("every"):].strip(" :="), what)
        if text.startswith("indices"):
            rest = text[len("indices"):].strip(" :=")
            parts = [p for p in rest.replace(" ", ",").split(",") if p]
            if not parts:
                raise ValueError(f"{what}: write indices:1,5,9")
            return cls(kind="indices", indices=tuple(_as_int(p, f"{what} index") for p in parts))
        try:
            return cls(kind="indices", indices=(int(text),))
        except ValueError:
            pass
        raise ValueError(
            f"unknown {what} rule {value!r}; use middle, first, last, all, 'every N', 'indices:1,2,3' or a list"
        )

    @classmethod
    def _every(cls, step: Any, what: str) -> "IndexRule":
        n = _as_int(step, f"{what} 'every' step")
        if n < 1:
            raise ValueError(f"{what}: 'every N' needs N >= 1, got {n}")
        return cls(kind="every", step=n)

    @property
    def expands(self) -> bool:
        """True when the rule may yield several images per source (each gets an id suffix)."""
        return self.kind in _EXPANDING

    def select(self, n: int) -> list[int]:
        """Indices kept out of n; negative indices count from the end. Raises IndexError when out of range."""
        if n <= 0:
            return []
        if self.kind == "middle":
            return [n // 2]
        if self.kind == "first":
            return [0]
        if self.kind == "last":
            return [n - 1]
        if self.kind == "all":
            return list(range(n))
        if self.kind == "every":
            return list(range(0, n, self.step))
        out = []
        for i in self.indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise IndexError(f"index {i} is out of range for {n} frames/slices")
            out.append(j)
        return out

    def describe(self) -> str:
        if self.kind == "every":
            return f"every {self.step}"
        if self.kind == "indices":
            return "indices:" + ",".join(str(i) for i in self.indices)
        return self.kind


_AXES = {"sagittal": 0, "coronal": 1, "axial": 2, "x": 0, "y": 1, "z": 2}
AXIS_NAMES = ("sagittal", "coronal", "axial")


def parse_axis(value: Any) -> int:
    if value is None:
        return 2
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    if isinstance(value, str) and value.strip().lower() in _AXES:
        return _AXES[value.strip().lower()]
    if isinstance(value, str) and value.strip() in ("0", "1", "2"):
        return int(value)
    raise ValueError(f"axis must be axial, coronal, sagittal or 0/1/2 (RAS axes), got {value!r}")


def validate_dicom_keywords(keywords: Iterable[str] | str) -> tuple[str, ...]:
    """Check an allow-list of DICOM keywords (e.g. ["SeriesDescription"], or "A, B" text); sequences are
    refused because they can carry nested identifiers."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    if isinstance(keywords, str):
        keywords = [t for t in keywords.replace(" ", ",").split(",") if t]
    out: list[str] = []
    for kw in keywords:
        if not isinstance(kw, str) or tag_for_keyword(kw) is None:
            raise ValueError(f"keep_dicom_tags: {kw!r} is not a DICOM keyword (write e.g. SeriesDescription)")
        if dictionary_VR(tag_for_keyword(kw)) == "SQ":
            raise ValueError(f"keep_dicom_tags: {kw} is a sequence; only plain attributes can be kept")
        if kw not in out:
            out.append(kw)
    return tuple(out)


OPTION_KEYS = ("window", "frame", "slices", "axis", "volume", "keep_16bit", "allow_burned_in", "keep_dicom_tags")
# Catalog spellings reserved by datasets_catalog.catalog.EXTRA_OPTION_KEYS, mapped onto OPTION_KEYS.
OPTION_ALIASES = {"slice_axis": "axis", "allow_burned_in_annotation": "allow_burned_in"}
FORMAT_SECTIONS = ("dicom", "nifti")   # `dicom: {...}` / `nifti: {...}` override the shared keys per format
ALL_OPTION_KEYS = (*OPTION_KEYS, *OPTION_ALIASES, "percentiles", *FORMAT_SECTIONS)


def normalise_option_keys(data: dict[str, Any], fmt: str | None = None, strict: bool = True) -> dict[str, Any]:
    """Flatten catalog options for one source format: apply `dicom:`/`nifti:` sections, aliases and
    `percentiles: [lo, hi]`. Keys that belong to other extensions are dropped unless `strict`; a near miss
    of one of ours (a typo) is always an error."""
    import difflib

    data = dict(data or {})
    sections = {}
    for sec in FORMAT_SECTIONS:
        value = data.pop(sec, None)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{sec} must be a mapping of options for {sec.upper()} files, got {value!r}")
        sections[sec] = dict(value or {})
        if "dicom" in sections[sec] or "nifti" in sections[sec]:
            raise ValueError(f"{sec}: sections cannot be nested")
    if fmt is not None:
        data.update(sections.get(fmt.lower(), {}))
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = OPTION_ALIASES.get(key, key)
        if key == "percentiles":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ValueError(f"percentiles must be [LO, HI], e.g. [1, 99], got {value!r}")
            key, value = "window", f"percentile:{value[0]},{value[1]}"
        if key not in OPTION_KEYS:
            close = difflib.get_close_matches(str(key), ALL_OPTION_KEYS, n=1, cutoff=0.75)
            if strict or close:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown medical option {key!r}{hint}; allowed: {', '.join(ALL_OPTION_KEYS)}")
            continue
        if key in out and out[key] != value:
            raise ValueError(f"option {key!r} is given twice (an alias and its name) with different values")
        out[key] = value
    if fmt is None:  # validate both sections too, so a catalog error shows up at load time
        for values in sections.values():
            if values:
                normalise_option_keys({**out, **values}, None, strict)
    return out


@dataclass(frozen=True)
class MedicalOptions:
    """Per-dataset options for medical sources (catalog keys of the same names)."""

    window: WindowSpec = field(default_factory=WindowSpec)
    frame: IndexRule = field(default_factory=IndexRule)
    slices: IndexRule = field(default_factory=IndexRule)
    axis: int = 2
    volume: int = 0
    keep_16bit: bool = False
    allow_burned_in: bool = False
    keep_dicom_tags: tuple[str, ...] = ()
    max_pixels: int | None = None

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, max_pixels: int | None = None, fmt: str | None = None,
                     strict: bool = True) -> "MedicalOptions":
        """Validate catalog options (for one format when `fmt` is "DICOM"/"NIFTI": its section applies);
        bad values raise ValueError naming the key. `strict=False` ignores other extensions' keys."""
        data = normalise_option_keys(data or {}, fmt, strict)

        def flag(key: str) -> bool:
            v = data.get(key, False)
            if not isinstance(v, bool):
                raise ValueError(f"{key} must be true or false, got {v!r}")
            return v

        def wrap(key: str, fn):
            try:
                return fn()
            except ValueError as exc:
                msg = str(exc)
                raise ValueError(msg if msg.startswith(key) else f"{key}: {msg}") from None

        tags = data.get("keep_dicom_tags", ())
        if not isinstance(tags, (str, list, tuple)):
            raise ValueError(f"keep_dicom_tags must be a list of DICOM keywords, got {tags!r}")
        volume = wrap("volume", lambda: _as_int(data.get("volume", 0), "volume"))
        if volume < 0:
            raise ValueError(f"volume must be >= 0, got {volume}")
        return cls(
            window=wrap("window", lambda: WindowSpec.parse(data.get("window"))),
            frame=wrap("frame", lambda: IndexRule.parse(data.get("frame"), "frame")),
            slices=wrap("slices", lambda: IndexRule.parse(data.get("slices"), "slices")),
            axis=wrap("axis", lambda: parse_axis(data.get("axis"))),
            volume=volume,
            keep_16bit=flag("keep_16bit"),
            allow_burned_in=flag("allow_burned_in"),
            keep_dicom_tags=validate_dicom_keywords(tags),
            max_pixels=max_pixels,
        )


class MedicalImageError(Exception):
    """A medical source that cannot become a shard image; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """One displayable image out of a medical source (one DICOM frame, one NIfTI slice)."""

    png: bytes            # lossless PNG of the display pixels (L, RGB or I;16)
    width: int
    height: int
    mode: str
    format: str           # "DICOM" or "NIFTI": the source format
    sha256: str           # hash of the decoded source pixels (not of the PNG): duplicates across exports
    meta: dict[str, Any]  # technical metadata only: no identifiers
    index: int | None = None   # frame or slice index when the source holds several
    suffix: str | None = None  # sample-id suffix when the rule expands ("f3", "s12"), else None


def looks_like_dicom(head: bytes, path: str | PurePath | None = None) -> bool:
    """The 'DICM' magic after the 128-byte preamble, or a .dcm/.dicom name (files without preamble)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    name = str(path or "").lower()
    return name.endswith((".dcm", ".dicom"))


def looks_like_nifti(head: bytes, path: str | PurePath | None = None) -> bool:
    """NIfTI-1/2 magic (n+1 / n+2, also inside a gzip stream), or a .nii/.nii.gz name."""
    name = str(path or "").lower()
    if name.endswith((".nii", ".nii.gz")):
        return True
    if head[:2] == b"\x1f\x8b":
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read(352)
        except (OSError, EOFError):
            return False
    return (len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")) or head[4:8] == b"n+2\x00"


def medical_format(head: bytes, path: str | PurePath | None = None) -> str | None:
    if looks_like_dicom(head, path):
        return "DICOM"
    if looks_like_nifti(head, path):
        return "NIFTI"
    return None


def is_medical(head: bytes, path: str | PurePath | None = None) -> bool:
    return medical_format(head, path) is not None


class OptionError(ValueError):
    """A bad medical option in a catalog; `key` is the catalog field to name in the message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def validate_catalog_options(extra: dict[str, Any] | None) -> None:
    """Check a dataset's extension options at catalog load time (both format sections); raises OptionError
    naming the offending key. Keys of other extensions are left alone."""
    extra = dict(extra or {})
    try:
        MedicalOptions.from_mapping(extra, strict=False)
        for fmt in FORMAT_SECTIONS:
            if extra.get(fmt):
                MedicalOptions.from_mapping(extra, fmt=fmt, strict=False)
    except ValueError as exc:
        message = str(exc)
        head = message.split(":", 1)[0].split(" ", 1)[0]
        written = {OPTION_ALIASES.get(k, k): k for k in extra}   # report the spelling the user wrote
        if head in written:
            key = written[head]
        else:
            key = next((k for k in extra if repr(k) in message or k == head), "options")
        raise OptionError(key, message) from None


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
