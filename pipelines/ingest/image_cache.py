"""Each distinct image is processed once per worker process, whichever records name it.

VQA-style datasets ask ten questions or more about each image: probing, hashing and (with `store_pixels`)
decoding and resizing the image once per question was most of an ingest's time. `ImageCache` keeps the
outcome per file (the probe, or the `ImageError` that rejected it) and the finished shard struct per
(file, frame, target settings), keyed by the resolved path plus size, mtime and inode from `stat`, so an
edited or replaced file is probed again. It lives for the worker process (across the chunks it runs) and is
bounded by the bytes it holds (least recently used entries go first).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Hashable

CACHE_BYTES = 128 * 1024 * 1024   # per cache and worker process; an entry larger than this is not kept


def file_key(path: str, st: os.stat_result) -> tuple:
    """Identity of one version of one file (what invalidates a cached probe)."""
    return (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class ImageCache:
    """LRU map of hashable keys to (value, size in bytes); `get` returns None for a miss."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self.entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self.entries.popitem(last=False)
            self.bytes -= freed

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def struct_size(struct: dict[str, Any]) -> int:
    """Bytes held by one image struct (its encoded bytes and stored pixels; the rest is small)."""
    return 512 + sum(len(v) for v in struct.values() if isinstance(v, (bytes, bytearray)))


# One cache per worker process: probes and structs (the settings are part of every struct key).
PROBES = ImageCache(CACHE_BYTES // 2)   # mostly needed for errors and multi-frame files
STRUCTS = ImageCache()
