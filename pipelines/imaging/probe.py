"""Image I/O behind one function: `probe_image(path, max_pixels)` reads a file once, sniffs its format from the
first bytes, reads the size from the header (never a full decode just to get the size) and returns the bytes
to embed with their sha256.

Files are checked before they are read (`check_file`): only regular files are opened, a file over
`max_bytes` (the catalog's `max_image_bytes`) is rejected from its `stat`, and the format sniff and the
PNG/JPEG pixel cap look at a bounded prefix before the rest is read. So a FIFO cannot hang a worker and one
worker holds at most one file of `max_bytes` (plus its prefix) at a time.

Formats are handlers in a small registry (`register_format`), so DICOM and NIfTI readers plug in without
touching ingest. Every failure is an `ImageError` whose `reason` is a stable code from
`datasets_catalog.records.REASONS`.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from datasets_catalog.catalog import DEFAULT_MAX_IMAGE_BYTES
from datasets_catalog.records import RecordError


class ImageError(RecordError):
    """An image that cannot be used; `reason` is one of the image_* / path_* codes of REASONS."""


@dataclass(frozen=True)
class ImageProbe:
    width: int
    height: int
    format: str                       # PNG, JPEG, DICOM, NIFTI, ...
    data: bytes                       # the bytes to embed in the shard (original file bytes for PIL formats)
    sha256: str                       # hex digest of the source content (duplicate / leakage checks)
    meta: dict[str, Any] | None = None
    # A multi-frame source expanded by a catalog rule (e.g. DICOM `frame: all`): ingest writes one row per
    # frame, with sample_id "<dataset>:<line>:<frame>". None for ordinary images.
    frames: tuple["ImageProbe", ...] | None = None


@dataclass(frozen=True)
class ProbeContext:
    max_pixels: int                   # decompression-bomb cap, compared with the header's width * height
    options: dict[str, Any] = field(default_factory=dict)   # DatasetSpec.extra_options
    verify: bool = False              # also decode every pixel (slow; catches corruption inside the data)


@dataclass(frozen=True)
class FormatHandler:
    name: str
    sniff: Callable[[bytes, Path], bool]                       # (first 512 bytes, path) -> is it mine?
    probe: Callable[[bytes, Path, ProbeContext], ImageProbe]   # (whole file, path, context) -> probe


# Tried in order on each file's first bytes; the built-in PIL handler (registered below) comes last. Other
# formats are added by an explicit call (`pipelines.imaging.medical_hooks.register_medical_imaging`, which
# the ingest chunk makes in every worker process) rather than by importing this module.
HANDLERS: list[FormatHandler] = []


def register_format(handler: FormatHandler, first: bool = True) -> None:
    """Add a format handler; `first` puts it before the built-in PIL handler. Re-registering a name replaces it."""
    HANDLERS[:] = [h for h in HANDLERS if h.name != handler.name]
    if first:
        HANDLERS.insert(0, handler)
    else:
        HANDLERS.append(handler)


# -- paths --------------------------------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=64)
def _real_root(data_dir: str) -> str:
    return os.path.realpath(data_dir)


_real_dir = functools.lru_cache(maxsize=4096)(os.path.realpath)


def clear_path_cache() -> None:
    """Forget cached folder realpaths (ingest calls this per chunk, so re-pointed links are seen)."""
    _real_root.cache_clear()
    _real_dir.cache_clear()


def _realpath(lexical: str) -> str:
    """os.path.realpath with the folder part cached: one lstat per file instead of one per component."""
    try:
        mode = os.lstat(lexical).st_mode
    except OSError:
        return os.path.realpath(lexical)
    if stat.S_ISLNK(mode):
        return os.path.realpath(lexical)
    head, tail = os.path.split(lexical)
    return os.path.join(_real_dir(head), tail)


def resolve_image_path(data_dir: Path, path: str) -> tuple[Path, str]:
    """(file to read, path relative to data_dir) for an image path from a record, or ImageError.

    Upstream strips a leading separator and joins to data_dir; we accept that, and absolute paths that lie
    inside data_dir, but reject `..`, absolute paths elsewhere and symlinks that leave data_dir.
    """
    if "\x00" in path:
        raise ImageError("path_invalid", f"image path {path!r} holds a NUL byte; fix the path")
    root = _real_root(str(data_dir))
    if os.path.isabs(path):
        lexical = os.path.normpath(path)
        if not _inside(lexical, root) and not _inside(lexical, os.path.normpath(str(data_dir))) \
                and _inside(_real_dir(os.path.dirname(lexical)), root):
            # spelled through a symlink to data_dir (the catalog's own spelling of a linked folder)
            lexical = os.path.join(_real_dir(os.path.dirname(lexical)), os.path.basename(lexical))
        if not _inside(lexical, root) and not _inside(lexical, os.path.normpath(str(data_dir))):
            stripped = os.path.normpath(os.path.join(root, path.lstrip("/\\")))
            if not os.path.exists(stripped):
                raise ImageError("path_escapes_data_dir", f"absolute path {path!r} is outside data_dir {root}; "
                                                          f"write image paths relative to data_dir")
            lexical = stripped
    else:
        lexical = os.path.normpath(os.path.join(root, path))
        if not _inside(lexical, root):
            raise ImageError("path_escapes_data_dir", f"path {path!r} leaves data_dir {root} (via '..'); "
                                                      f"keep images inside data_dir")
    real = _realpath(lexical)
    if not _inside(real, root):
        raise ImageError("path_escapes_data_dir", f"path {path!r} is a symlink to {real}, outside data_dir "
                                                  f"{root}; copy the file into data_dir instead")
    rel = os.path.relpath(lexical, root) if _inside(lexical, root) else os.path.relpath(real, root)
    return Path(real), Path(rel).as_posix()


# -- probing ------------------------------------------------------------------------------------------

_PREFIX = 64 * 1024   # the header probe's read: enough for PNG IHDR, JPEG SOF after typical EXIF, DICOM preamble


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_stat(path: Path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("image_not_regular_file", f"{path} is {_kind(st.st_mode)}, not an image file; point the "
                                                   f"record at a regular file")
    if st.st_size > max_bytes:
        raise ImageError("image_too_big", f"{path} is {st.st_size:,} bytes, over max_image_bytes {max_bytes:,}; "
                                          f"shrink the file or raise max_image_bytes in the catalog")


def check_file(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> os.stat_result:
    """The file's stat when it is a regular file within the size cap, else ImageError; never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("image_missing", f"image file {path} does not exist; check the path and data_dir") from None
    except PermissionError:
        raise ImageError("image_missing", f"image file {path} cannot be read (permission denied)") from None
    except ValueError:
        raise ImageError("path_invalid", f"image path {str(path)!r} holds a NUL byte; fix the path") from None
    except OSError as exc:
        raise ImageError("image_missing", f"image file {path} cannot be found ({exc.strerror}); check the "
                                          f"path") from None
    _check_stat(path, st, max_bytes)
    return st


class _Reader:
    """An opened, checked image file: `prefix` read at once, `rest()` on demand, both bounded by max_bytes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        check_file(path, max_bytes)
        try:   # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open; fstat below rejects it
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ImageError("image_missing", f"image file {path} does not exist; check the path") from None
        except OSError as exc:
            raise ImageError("image_missing", f"image file {path} cannot be read ({exc.strerror})") from None
        self.file = os.fdopen(fd, "rb")
        try:
            _check_stat(path, os.fstat(fd), max_bytes)
            self.path, self.max_bytes = path, max_bytes
            self.prefix = self.file.read(_PREFIX)
        except BaseException:
            self.file.close()
            raise

    def rest(self) -> bytes:
        more = self.file.read(self.max_bytes + 1 - len(self.prefix)) if len(self.prefix) == _PREFIX else b""
        data = self.prefix + more
        if len(data) > self.max_bytes:   # grew after the stat
            raise ImageError("image_too_big", f"{self.path} is over max_image_bytes {self.max_bytes:,}; shrink "
                                              f"the file or raise max_image_bytes in the catalog")
        return data

    def close(self) -> None:
        self.file.close()


def _read(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    reader = _Reader(path, max_bytes)
    try:
        return reader.rest()
    finally:
        reader.close()


def _header_pixels(head: bytes) -> tuple[int, int] | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_size(head)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg_size(head)
    return None


def probe_image(path: Path, max_pixels: int, options: dict[str, Any] | None = None,
                verify: bool = False, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageProbe:
    """Read `path` once and return its size, format, bytes and sha256; ImageError with a reason otherwise.

    The format and (PNG/JPEG) the pixel cap are checked on the first 64 KiB, before the rest is read."""
    reader = _Reader(path, max_bytes)
    try:
        head = reader.prefix[:512]
        if not head:
            raise ImageError("image_empty", f"image file {path} is empty (0 bytes)")
        handler = next((h for h in HANDLERS if h.sniff(head, path)), None)
        if handler is None:
            raise ImageError("image_unsupported", f"{path} is not an image format MedLoom reads (first bytes "
                                                  f"{head[:8]!r}); convert it to PNG or JPEG")
        size = _header_pixels(reader.prefix)
        if size is not None:
            check_pixels(path, *size, max_pixels)
        data = reader.rest()
    finally:
        reader.close()
    context = ProbeContext(max_pixels=max_pixels, options=dict(options or {}), verify=verify)
    return handler.probe(data, path, context)


def check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Shared size checks for every handler: empty sizes and the decompression-bomb cap."""
    if width <= 0 or height <= 0:
        raise ImageError("image_empty", f"{path} declares a {width}x{height} image; it has no pixels")
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{path} is {width}x{height} = {width * height:,} pixels, over the "
                                            f"cap of {max_pixels:,} (max_image_pixels in the catalog); "
                                            f"downscale it or raise the cap if you trust the file")


# -- built-in PIL formats -----------------------------------------------------------------------------

_PIL_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _pil_sniff(head: bytes, path: Path) -> bool:
    return head.startswith(_PIL_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _png_complete(data: bytes) -> bool:
    """Walk the PNG chunk list: every chunk length fits and the file reaches IEND."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        pos += 12 + length
        if pos > end:
            return False
        if kind == b"IEND":
            return True
    return False


def _jpeg_complete(data: bytes) -> bool:
    return data.rfind(b"\xff\xd9", max(0, len(data) - 256)) >= 0


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR (CRC checked), or None when the header is not sound."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    if zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        return None
    return struct.unpack_from(">II", data, 16)


def jpeg_sof_offset(data: bytes) -> int | None:
    """Offset of the first SOF (frame header) segment, walking the marker segments; None when not found.
    The segment holds precision, height, width and the component count (bytes +4 .. +9)."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:             # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):     # scan or end before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            return pos
        pos += 2 + length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment; None when not found."""
    pos = jpeg_sof_offset(data)
    if pos is None or pos + 9 > len(data):
        return None
    height, width = struct.unpack_from(">HH", data, pos + 5)
    return width, height


def _check_complete(path: Path, fmt: str, data: bytes) -> None:
    """PNG and JPEG end with a marker; a file without it was cut off (other formats: not checked here)."""
    if (fmt == "PNG" and not _png_complete(data)) or (fmt == "JPEG" and not _jpeg_complete(data)):
        raise ImageError("image_truncated", f"{path} ends early ({len(data):,} bytes, no end marker); the file "
                                            f"was cut off: copy it again")


def _pil_probe(data: bytes, path: Path, context: ProbeContext) -> ImageProbe:
    # Fast path for the two formats of nearly every dataset: the size straight from the header bytes
    # (PIL's lazy open costs ~0.4 ms per file, more than hashing a 50 KB image).
    size, fmt = None, None
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        size, fmt = _png_size(data), "PNG"
    elif data.startswith(b"\xff\xd8\xff"):
        size, fmt = _jpeg_size(data), "JPEG"
    if size is not None and not context.verify:
        width, height = size
        check_pixels(path, width, height, context.max_pixels)
        _check_complete(path, fmt, data)
        return ImageProbe(width, height, fmt, data, hashlib.sha256(data).hexdigest())
    if size is not None:
        check_pixels(path, *size, context.max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))   # lazy: reads the header only
            width, height = image.size
            fmt = image.format or "UNKNOWN"
        except Image.DecompressionBombError:
            raise ImageError("image_too_large", f"{path} has more pixels than PIL allows to open "
                                                f"(decompression bomb)") from None
        except (UnidentifiedImageError, SyntaxError, OSError, ValueError, struct.error) as exc:
            raise ImageError("image_corrupt", f"{path} cannot be read as an image ({exc}); re-export the "
                                              f"file") from None
    check_pixels(path, width, height, context.max_pixels)
    _check_complete(path, fmt, data)
    if context.verify:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                Image.open(io.BytesIO(data)).load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file
            raise ImageError("image_corrupt", f"{path} fails to decode ({exc}); re-export the file") from None
    return ImageProbe(width, height, fmt, data, hashlib.sha256(data).hexdigest())


register_format(FormatHandler("pil", _pil_sniff, _pil_probe), first=False)
