"""Random access to shard rows by (file, row group, offset), one row group at a time, with bounded caches.

Footers are read once (row-group sizes only); row groups are read with pyarrow on demand and kept in a
small LRU cache bounded in bytes, so memory does not grow with the dataset. The cache is thread-safe (the
look-ahead threads of pipelines.mixture.prefetch read rows in parallel): a row group that one thread is
reading is waited for, never read twice, and the lock is never held during I/O.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage.uris import parquet_source   # local paths as they are; s3://... through pyarrow.fs


class ShardReadError(ValueError):
    """A shard file that is missing or does not read as Parquet (truncated, overwritten, not Parquet). `str()`
    names the file and says how to rebuild it; `dataset` is the shard folder's name (the ingest's --only)."""

    def __init__(self, path: Any, problem: str, catalog: Any = None) -> None:
        self.path, self.problem = str(path), problem
        self.dataset = PurePosixPath(self.path.rstrip("/")).parent.name
        super().__init__(f"{self.path}: {problem}; re-run the ingest with --force --only {self.dataset} "
                         f"(python jobs/ingest.py {catalog or 'CATALOG'} --force --only {self.dataset})")
        self.catalog = catalog

    def __reduce__(self):   # raised in loader processes: crosses a process boundary whole
        return type(self), (self.path, self.problem, self.catalog)


def shard_problem(exc: BaseException) -> str:
    """What went wrong reading a shard file, in a few words (the exception's first line, without pyarrow's
    type prefix)."""
    if isinstance(exc, FileNotFoundError):
        return "shard file is missing"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"shard file is unreadable ({text})"


def open_shard(path: Any) -> pq.ParquetFile:
    """`pq.ParquetFile` of one shard (its footer is read here), or `ShardReadError` naming the file."""
    try:
        return pq.ParquetFile(parquet_source(path))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ShardReadError(path, shard_problem(exc)) from None


@dataclass
class ShardLayout:
    """Row-group layout of one dataset's shard files (from footers; O(row groups) memory)."""

    files: list[Path]
    rg_file: np.ndarray      # per row group: file index
    rg_index: np.ndarray     # per row group: index inside its file
    rg_start: np.ndarray     # per row group: first dataset row
    rg_rows: np.ndarray      # per row group: number of rows
    rg_bytes: np.ndarray | None = None   # per row group: uncompressed bytes (sizes the caches)

    @property
    def rows(self) -> int:
        return int(self.rg_rows.sum())

    @classmethod
    def scan(cls, files: list[Path]) -> "ShardLayout":
        rg_file, rg_index, rg_rows, rg_bytes = [], [], [], []
        for fi, path in enumerate(files):
            meta = open_shard(path).metadata
            for ri in range(meta.num_row_groups):
                rg_file.append(fi)
                rg_index.append(ri)
                rg_rows.append(meta.row_group(ri).num_rows)
                rg_bytes.append(meta.row_group(ri).total_byte_size)
        rows = np.asarray(rg_rows, dtype=np.int64)
        return cls(list(files), np.asarray(rg_file, dtype=np.int64), np.asarray(rg_index, dtype=np.int64),
                   np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if len(rows) else rows, rows,
                   np.asarray(rg_bytes, dtype=np.int64))

    def find(self, row: int) -> tuple[int, int]:
        """(global row-group number, offset) of a dataset row."""
        g = int(np.searchsorted(self.rg_start, row, side="right")) - 1
        return g, int(row - self.rg_start[g])

    def row_group(self, rg: int) -> tuple[Path, int]:
        """(file, index inside that file) of global row group `rg`: what `RowGroupCache.table` takes."""
        return self.files[int(self.rg_file[rg])], int(self.rg_index[rg])


class RowGroupCache:
    """LRU of decoded row groups (Arrow tables) per column set, bounded by bytes and count."""

    def __init__(self, max_bytes: int = 256 << 20, max_items: int = 16) -> None:
        self.max_bytes, self.max_items = max_bytes, max_items
        self._items: OrderedDict[tuple, tuple[pa.Table, int]] = OrderedDict()
        self._bytes = 0
        self._local = threading.local()   # per-thread open files
        self._loading: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self.reads = 0

    def _file(self, path: Path) -> pq.ParquetFile:
        """This thread's open file: a `ParquetFile` must not be read by two threads at once."""
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
        f = files.get(path)
        if f is None:
            f = files[path] = open_shard(path)
            if len(files) > 32:
                files.popitem(last=False)
        else:
            files.move_to_end(path)
        return f

    def table(self, path: Path, rg: int, columns: tuple[str, ...] | None) -> pa.Table:
        k = (path, rg, columns)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                return hit[0]
            loading = self._loading.get(k)
            if loading is None:
                self._loading[k] = mine = Future()
        if loading is not None:   # another thread is reading it
            return loading.result()
        try:
            # one pyarrow thread: loader workers are processes already; pyarrow's pool only contends with them
            try:
                table = self._file(path).read_row_group(rg, columns=list(columns) if columns else None,
                                                        use_threads=False)
            except (OSError, ValueError, pa.ArrowException) as exc:
                if isinstance(exc, ShardReadError):
                    raise
                raise ShardReadError(path, f"row group {rg}: {shard_problem(exc)}") from None
        except BaseException as exc:
            with self._lock:
                del self._loading[k]
            mine.set_exception(exc)
            raise
        size = table.nbytes
        with self._lock:
            del self._loading[k]
            self.reads += 1
            self._items[k] = (table, size)
            self._bytes += size
            while len(self._items) > 1 and (self._bytes > self.max_bytes or len(self._items) > self.max_items):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old
        mine.set_result(table)
        return table


def table_row(table: pa.Table, offset: int) -> dict[str, Any]:
    return table.slice(offset, 1).to_pylist()[0]
