"""One place that turns a path or URI into something to read and write: local disk or object storage.

    as_path("shards")                         -> pathlib.Path (local: all existing code keeps working)
    as_path("file:///data/shards")            -> pathlib.Path("/data/shards")
    as_path("s3://bucket/medloom/shards")     -> RemotePath (pathlib-like, backed by pyarrow.fs.S3FileSystem)

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, ~/.aws, instance
roles: the AWS SDK's default chain), from an explicit `endpoint=` argument, or from pyarrow-style query
options on the URI itself (`s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`), which travel
with the string to Ray workers on other nodes. No hand-written S3 code: everything goes through pyarrow.fs.

Object stores have no rename, so "write elsewhere, then rename" becomes "write the payload, then the
completeness marker LAST" (`publish_tree`, `upload_tree`): a reader treats a dataset or checkpoint as complete
only when its marker (`_manifest.json`, `COMPLETE.json`) exists. A single object PUT is atomic on S3 (an
interrupted upload leaves no object), so one file is written in place there.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import shutil
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

LOCAL_SCHEMES = ("", "file")
S3_SCHEMES = ("s3", "s3a")
# pyarrow.fs.S3FileSystem options accepted as URI query parameters (same names as FileSystem.from_uri).
S3_QUERY_OPTIONS = {
    "endpoint_override": str, "scheme": str, "region": str, "access_key": str, "secret_key": str,
    "session_token": str, "anonymous": "bool", "allow_bucket_creation": "bool", "force_virtual_addressing": "bool",
}


class StorageError(ValueError):
    """A path or URI that cannot be used; `str()` is the one message to print."""


# -- parsing --------------------------------------------------------------------------------------------

def scheme_of(target: Union[str, os.PathLike]) -> str:
    """'' for a plain path, else the URI scheme in lower case ('file', 's3', ...)."""
    if isinstance(target, os.PathLike):
        return ""
    text = str(target)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_remote(target: Union[str, os.PathLike, "RemotePath", None]) -> bool:
    """True for object-storage URIs (s3://...), False for local paths and file:// URIs."""
    if target is None:
        return False
    if isinstance(target, RemotePath):
        return True
    return scheme_of(target) not in LOCAL_SCHEMES


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _endpoint_parts(endpoint: str) -> tuple[str, str | None]:
    """'http://host:port' -> ('host:port', 'http'); 'host:port' -> ('host:port', None)."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        return parts.netloc + parts.path.rstrip("/"), parts.scheme
    return endpoint.rstrip("/"), None


def s3_options(query: str = "", endpoint: str | None = None) -> tuple[tuple[str, object], ...]:
    """The S3FileSystem keyword arguments for a URI query and/or explicit endpoint, with AWS env fallbacks.

    Precedence: URI query > `endpoint` argument > AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL. Credentials are
    left to the AWS SDK's default chain unless the query names them."""
    opts: dict[str, object] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        kind = S3_QUERY_OPTIONS.get(key)
        if kind is None:
            raise StorageError(f"unknown S3 option {key!r} in the URI; allowed: {', '.join(S3_QUERY_OPTIONS)}")
        opts[key] = _bool(value) if kind == "bool" else value
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in opts:
        host, scheme = _endpoint_parts(endpoint)
        opts["endpoint_override"] = host
        if scheme and "scheme" not in opts:
            opts["scheme"] = scheme
    if "region" not in opts:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region or "endpoint_override" in opts:
            opts["region"] = region or "us-east-1"   # custom endpoints: skip the region lookup
    return tuple(sorted(opts.items()))


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: tuple[tuple[str, object], ...]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**dict(options))


def _local_path(target: Union[str, os.PathLike]) -> Path:
    text = os.fspath(target) if isinstance(target, os.PathLike) else str(target)
    if scheme_of(text) == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{text}: file:// URIs must name a local path (file:///abs/path)")
        text = parts.path
    return Path(text).expanduser()


def as_path(target: Union[str, os.PathLike, "RemotePath"], endpoint: str | None = None
            ) -> Union[Path, "RemotePath"]:
    """A local `Path` for paths and file:// URIs, a `RemotePath` for s3:// URIs (see the module doc)."""
    if isinstance(target, (RemotePath, Path)):
        return target
    scheme = scheme_of(target)
    if scheme in LOCAL_SCHEMES:
        return _local_path(target)
    text = str(target)
    parts = urlsplit(text)
    if scheme in S3_SCHEMES:
        if not parts.netloc:
            raise StorageError(f"{text}: an S3 URI needs a bucket: s3://BUCKET/prefix")
        path = (parts.netloc + "/" + parts.path.strip("/")).rstrip("/")
        options = s3_options(parts.query, endpoint)
        return RemotePath("s3", path, options)
    raise StorageError(f"{text}: unsupported storage scheme {scheme!r}; use a local path, file:// or s3://")


def filesystem_and_path(target: Union[str, os.PathLike, "RemotePath"], endpoint: str | None = None
                        ) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path inside it) for any path or URI: what pyarrow.parquet / datasets want."""
    p = as_path(target, endpoint)
    if isinstance(p, RemotePath):
        return p.fs, p.path
    return pafs.LocalFileSystem(), str(p.resolve())


def parquet_source(target: Union[str, os.PathLike, "RemotePath"]):
    """What `pyarrow.parquet.ParquetFile(...)` accepts for this file: the path itself when local, an open
    random-access pyarrow file when remote."""
    p = as_path(target)
    return p.open("rb") if isinstance(p, RemotePath) else p


# -- the remote path --------------------------------------------------------------------------------------

class RemotePath:
    """A pathlib-like handle on an object-storage key or prefix (enough of Path for the readers and writers).

    Directories are key prefixes: `mkdir` does nothing, `is_dir` means "some key starts with prefix/".
    `str()` is the full URI (query options included), so it can be shipped to another process and parsed
    again with `as_path`. There is deliberately no `__fspath__`: local-only code fails loudly instead of
    opening a file literally named "s3:"."""

    __slots__ = ("scheme", "path", "options")

    def __init__(self, scheme: str, path: str, options: tuple[tuple[str, object], ...] = ()) -> None:
        self.scheme, self.path, self.options = scheme, path.strip("/"), tuple(options)

    # identity
    @property
    def fs(self) -> pafs.FileSystem:
        return _s3_filesystem(self.options)

    @property
    def uri(self) -> str:
        query = urlencode([(k, str(v).lower() if isinstance(v, bool) else v) for k, v in self.options])
        return f"{self.scheme}://{self.path}" + (f"?{query}" if query else "")

    def display(self) -> str:
        """The URI without credentials (for messages and manifests)."""
        return f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.display()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.scheme, self.path, self.options) == \
            (other.scheme, other.path, other.options)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path, self.options))

    def __lt__(self, other: "RemotePath") -> bool:
        return self.path < other.path

    def __reduce__(self):
        return (RemotePath, (self.scheme, self.path, self.options))

    # path algebra
    def __truediv__(self, part: Union[str, os.PathLike]) -> "RemotePath":
        part = os.fspath(part) if isinstance(part, os.PathLike) else str(part)
        return RemotePath(self.scheme, posixpath.join(self.path, part.strip("/")), self.options)

    def joinpath(self, *parts: str) -> "RemotePath":
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.scheme, posixpath.dirname(self.path), self.options)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def resolve(self) -> "RemotePath":
        return self

    def expanduser(self) -> "RemotePath":
        return self

    # queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.display())
        return int(info.size)

    def iterdir(self) -> Iterator["RemotePath"]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        for info in sorted(self.fs.get_file_info(selector), key=lambda i: i.path):
            yield RemotePath(self.scheme, info.path, self.options)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Non-recursive glob on names (`*.parquet`, `stream_state.*.json`)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def walk_files(self) -> list[tuple[str, "RemotePath"]]:
        """(relative key, path) of every object under this prefix, sorted."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                out.append((posixpath.relpath(info.path, self.path), RemotePath(self.scheme, info.path,
                                                                                self.options)))
        return sorted(out, key=lambda kv: kv[0])

    # reading and writing
    def open(self, mode: str = "rb"):
        """'rb' -> a random-access pyarrow file (seekable; what Parquet readers need); 'wb' -> an output
        stream (the object appears when it is closed)."""
        if mode in ("rb", "r"):
            return self.fs.open_input_file(self.path)
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"RemotePath.open supports 'rb' and 'wb', not {mode!r}")

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not self.is_file():
                raise FileNotFoundError(f"{self.display()}: no such object") from None
            raise exc

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no creating; only the bucket must exist (we never create buckets implicitly)."""
        if self.fs.get_file_info(self.bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {self.bucket!r} does not exist (or these credentials cannot see it) at "
                               f"{dict(self.options).get('endpoint_override', 'AWS S3')}; create it first "
                               f"(aws s3 mb s3://{self.bucket})")

    def create_bucket(self) -> None:
        """Create this path's bucket (tests, first-time setup)."""
        fs = _s3_filesystem(tuple(sorted({**dict(self.options), "allow_bucket_creation": True}.items())))
        fs.create_dir(self.bucket)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise

    def rmtree(self) -> None:
        """Delete every object under this prefix (and the prefix itself)."""
        if self.is_dir():
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
            try:
                self.fs.delete_dir(self.path)
            except OSError:
                pass
        elif self.is_file():
            self.fs.delete_file(self.path)


AnyPath = Union[Path, RemotePath]


# -- generic helpers (local Path or RemotePath) ---------------------------------------------------------

def rmtree(path: AnyPath) -> None:
    """Remove a folder or prefix and everything under it; nothing if it does not exist."""
    if isinstance(path, RemotePath):
        path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def write_bytes_atomic(path: AnyPath, data: bytes) -> None:
    """Local: write a sibling temp file, then rename. Remote: one PUT (atomic on object stores)."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: AnyPath, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def files_under(root: AnyPath) -> list[tuple[str, AnyPath]]:
    """(relative posix path, path) of every file under a folder or prefix, sorted."""
    if isinstance(root, RemotePath):
        return root.walk_files()
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            out.append((full.relative_to(root).as_posix(), full))
    return sorted(out, key=lambda kv: kv[0])


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    """Copy one file between any two locations (server-side copy within one object store)."""
    if isinstance(src, RemotePath) and isinstance(dst, RemotePath) and src.options == dst.options:
        src.fs.copy_file(src.path, dst.path)
        return
    sfs, spath = filesystem_and_path(src)
    dfs, dpath = filesystem_and_path(dst)
    if isinstance(dst, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def is_complete(folder: AnyPath, marker: str) -> bool:
    """The one rule every reader follows: a dataset / checkpoint folder is complete iff its marker exists."""
    return (folder / marker).is_file()


def upload_tree(local_dir: Path, destination: AnyPath, marker: str | None = None,
                clear_destination: bool = True) -> list[str]:
    """Copy a finished local folder to `destination`, the `marker` file LAST.

    The destination's old marker is deleted first (so from then on it never looks complete while it is
    being replaced), then its other files, then the payload is copied and finally the marker. Returns the
    relative names copied. Works for local destinations too (then prefer `publish_tree`, which renames)."""
    destination.mkdir(parents=True, exist_ok=True)
    if marker is not None:
        (destination / marker).unlink(missing_ok=True)
    if clear_destination:
        _delete_files(destination)
    names = []
    marker_src = None
    for rel, path in files_under(local_dir):
        if marker is not None and rel == marker:
            marker_src = path
            continue
        copy_file(path, destination / rel)
        names.append(rel)
    if marker_src is not None:
        copy_file(marker_src, destination / marker)
        names.append(marker)
    return names


def download_tree(source: AnyPath, local_dir: Path) -> list[str]:
    """Copy every file under `source` into `local_dir` (created). Returns the relative names."""
    local_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for rel, path in files_under(source):
        copy_file(path, local_dir / rel)
        names.append(rel)
    return names


def publish_tree(staging: AnyPath, destination: AnyPath, marker: str, marker_bytes: bytes) -> None:
    """Make `destination` hold exactly `staging`'s files plus `marker`, which is written last.

    Local disk: the marker goes into the staging folder, then the folder is swapped into place with renames
    (readers see the old complete folder or the new one). Object storage (no rename): delete the old
    marker, delete the old files, copy the staged files across (server-side), write the marker, delete the
    staging prefix. An interruption anywhere leaves `destination` without a marker (incomplete, never
    half-new and looking complete) or still complete with the old content."""
    if isinstance(staging, Path) and isinstance(destination, Path):
        write_bytes_atomic(staging / marker, marker_bytes)
        old = None
        if destination.exists():
            # named like a staging folder, so the ingest's stale-staging sweep removes it after a crash
            old = destination.with_name(f".staging-old-{destination.name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    publish_files({rel: path for rel, path in files_under(staging) if rel != marker}, destination, marker,
                  marker_bytes)
    rmtree(staging)


def _delete_files(destination: AnyPath) -> None:
    for _, path in files_under(destination):
        path.unlink(missing_ok=True) if isinstance(path, RemotePath) else path.unlink()


def publish_files(files: dict[str, AnyPath], destination: AnyPath, marker: str, marker_bytes: bytes) -> None:
    """The object-storage publish step on an explicit {relative name: source file} mapping (sources may be
    renamed on the way: object stores copy instead). Old marker first, old files, new files, marker last."""
    (destination / marker).unlink(missing_ok=True)
    _delete_files(destination)
    for rel in sorted(files):
        copy_file(files[rel], destination / rel)
    write_bytes_atomic(destination / marker, marker_bytes)


def unpublish(destination: AnyPath, marker: str) -> None:
    """Withdraw a published folder: marker first (it stops looking complete at once), then the rest."""
    (destination / marker).unlink(missing_ok=True)
    rmtree(destination)
